"""Stain: upload H&E, choose a staining model and a stain, see H&E | IHC side by side with the
DAB quantification of each IHC image (virtual staining: ``pixgen.staining``; DAB: ``metrics.staining``)."""

import numpy as np
import streamlit as st

from pixgen.io import load_rgb, save_png
from studio import core

try:  # virtual staining (issue #17) may be missing from this installation: say so instead of failing
    from pixgen.staining import StainPipeline
except ImportError:
    StainPipeline = None
try:
    from metrics.staining import dab_overlay, quantify_dab
except ImportError:
    quantify_dab = dab_overlay = None


@st.cache_resource(scope="session", show_spinner="loading the stain model ...", max_entries=2)
def stain_model(source: str, token: str | None):
    """A stain model loaded once per session; only a hub id may touch the network."""
    if source.startswith("hub:"):
        return StainPipeline.from_pretrained(source[4:], token=token, local_files_only=False)
    return StainPipeline.from_pretrained(source, local_files_only=True)


st.header("Stain")
core.cancelled_notice()
if StainPipeline is None:
    st.warning("Virtual staining is not available in this installation: `pixgen.staining` is missing "
               "(it comes with pixgen's virtual-staining release, issue #17). The other pages work without it.")
    st.stop()

with core.shown_errors():
    with st.sidebar:
        kind = st.radio("Stain model", ["local folder", "hub id"], key="stain_kind",
                        help="a folder written by the staining training commands, or a hub id (fetched)")
        if kind == "local folder":
            folder = st.text_input("Stain model folder (under the data root)", key="stain_dir")
            if not folder:
                st.info("Type the folder of a stain model (written by the staining training commands).")
                st.stop()
            source, token = str(core.under_root(folder, "stain model folder")), None
        else:
            source = "hub:" + st.text_input("Hub id", "StonyBrook-CVLab/pixcell-virtual-staining", key="stain_hub")
            token = st.text_input("Hub token (gated models)", type="password", key="stain_token") or None
    pipe = stain_model(source, token)
    to = st.selectbox("Stain", pipe.stains, key="stain_to",
                      format_func=lambda s: f"{s} ({pipe.describe()[s]['marker']})")
    uploads = st.file_uploader("H&E tiles", type=["png", "jpg", "jpeg", "tif", "tiff"], accept_multiple_files=True,
                               key="stain_he")
    c1, c2 = st.columns(2)
    steps = c1.number_input("Steps", 1, 200, 20, key="stain_steps")
    seed = c2.number_input("Seed", 0, 2**53 - 1, 0, key="stain_seed")
    if st.button("Stain", type="primary", disabled=not uploads, key="stain_go"):
        st.session_state.pop("stain_out", None)  # a run cancelled or refused shows no earlier result as its own
        paths = [core.save_upload(f, "he") for f in uploads]
        direct = pipe.components(to)[0] is None  # the direct baseline samples all tiles in one batch
        total = (1 if direct else -(-len(paths) // 8)) * steps
        with core.running("cancel_stain", total) as progress:
            result = pipe.run(paths, to, seed=seed, num_inference_steps=steps, names=[p.name for p in paths],
                              callback=progress)
        out = core.new_run_folder("stain")
        out.mkdir()
        for path, ihc in zip(paths, result.images):
            save_png(ihc, out / f"{path.stem}_{to}.png", provenance={"he": path.name, **result.settings})
        st.session_state["stain_out"] = (str(out), [str(p) for p in paths], to,
                                         pipe.components(to)[1].config.get("mpp"))

if "stain_out" in st.session_state:
    with core.shown_errors():
        from pathlib import Path

        out, he_paths, to, mpp = st.session_state["stain_out"]
        rows = []
        for he in map(Path, he_paths):
            ihc = load_rgb(Path(out) / f"{he.stem}_{to}.png")
            c1, c2, c3 = st.columns(3)
            c1.image(load_rgb(he), caption=f"H&E {he.name}", width=224)
            c2.image(ihc, caption=f"IHC ({to})", width=224)
            if quantify_dab is not None:
                q = quantify_dab(ihc, mpp=mpp or 0.5, name=he.name)
                c3.image(dab_overlay(ihc, q), caption="DAB: nuclei red = positive, blue = negative", width=224)
                rows.append({"tile": he.name, **{k: round(v, 3) if isinstance(v, float) and np.isfinite(v) else v
                                                 for k, v in q.summary().items()}})
        if quantify_dab is None:
            st.info("DAB quantification is not available (`metrics.staining` is missing).")
        else:
            st.table(rows)
        st.download_button("Download the IHC images (zip)", core.zip_folder(Path(out)),
                           file_name=f"pixgen-stain-{Path(out).name}.zip", mime="application/zip")
