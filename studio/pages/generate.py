"""Generate: tiles from a label (the prior), references, a prompt or an embeddings file; a gallery
with each image's provenance; the set (images + manifest) as a zip."""

from pathlib import Path

import streamlit as st

from pixgen.io import SetManifest, read_provenance
from pixgen.sets import write_set
from studio import core, jobs

st.header("Generate")
core.cancelled_notice()
with core.shown_errors():
    source, token = core.model_picker()
    gen = core.load_generator(source, token)
    labels = gen.labels
    kind = st.radio("Condition", ["label", "reference images", "prompt", "embeddings file"], horizontal=True,
                    key="gen_kind")
    argv = ["generate", "--model", core.model_path(source)]
    missing = None
    if kind == "label":
        argv += ["--label", st.selectbox("Label", labels)]
        if st.checkbox("Draw real training-tile embeddings (bank) instead of the prior", disabled=gen.prior is None):
            argv += ["--from-bank"]
    elif kind == "prompt":
        argv += ["--prompt", st.text_input("Prompt", "colon, inflammatory-rich", help="the prior's vocabulary: `pixgen info`",
                                           key="gen_prompt")]
    elif kind == "reference images":
        refs = st.file_uploader("Reference tiles", type=["png", "jpg", "jpeg", "tif", "tiff"], accept_multiple_files=True,
                                key="gen_refs")
        argv += ["--reference", *[core.save_upload(f, "references") for f in refs]]
        missing = None if refs else "upload one or more reference tiles"
    else:
        emb = st.file_uploader("Embeddings file", type=["safetensors", "npy", "pt"], key="gen_emb")
        argv += ["--embeddings", core.save_upload(emb, "embeddings")] if emb else []
        missing = None if emb else "upload an embeddings file"
    c1, c2, c3, c4 = st.columns(4)
    n = c1.number_input("Images (per condition)", 1, 64, 4, key="gen_n")
    seed = c2.number_input("Seed", 0, 2**53 - 1, 0)
    steps = c3.number_input("Steps", 1, 200, int(gen.config["num_inference_steps"]), key="gen_steps")
    guidance = c4.number_input("Guidance", 0.0, 20.0, float(gen.config["guidance_scale"]), step=0.25)
    argv += ["--n", n, "--seed", seed, "--steps", steps, "--guidance", guidance]
    if st.button("Generate", type="primary", key="gen_go"):
        if missing:
            st.error(f"Nothing to generate from: {missing}.")
        else:
            args = jobs.cli_args([*argv, "--out", core.new_run_folder("generate")])
            args.token = token
            conditions = len(args.reference or []) or 1
            st.session_state.pop("generate_out", None)  # a refused request shows no earlier set as its result
            with core.running("cancel_generate", -(-n * conditions // args.batch_size) * steps) as progress:
                # shown from the first batch on: a cancelled set appears as what it is, incomplete
                st.session_state["generate_out"] = str(args.out)
                write_set(gen, args, callback=progress, progress=False)

def show_set(out: Path) -> None:
    """The set's images with their provenance (only the finished ones of a set broken off), and its zip."""
    manifest = SetManifest.load(out)
    if manifest.complete:
        st.subheader(f"{len(manifest.files)} images")
    else:
        st.subheader(f"Incomplete set (cancelled): {len(manifest.files)} images finished")
        st.warning("This set was broken off: only its finished images are shown, and its manifest says complete: false.")
    paths = manifest.image_paths(out) if manifest.complete else [out / e.file for e in manifest.files]
    cols = st.columns(4)
    for i, (path, entry) in enumerate(zip(paths, manifest.files)):
        with cols[i % 4]:
            cond = Path(entry.condition.id).name if entry.condition.kind == "reference" else entry.condition.id
            st.image(str(path), caption=f"{entry.file} · seed {entry.seed} · {entry.condition.kind} {cond}")
            with st.expander("provenance"):
                st.json(read_provenance(path), expanded=False)
    st.download_button("Download the set (zip: images + manifest.json)", core.zip_folder(out),
                       file_name=f"pixgen-set-{out.name}.zip", mime="application/zip")


if "generate_out" in st.session_state:
    with core.shown_errors(), core.settled():
        if SetManifest.exists(st.session_state["generate_out"]):  # none when a run was refused or stopped before its first image
            show_set(Path(st.session_state["generate_out"]))
