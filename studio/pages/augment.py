"""Augment: a labelled folder under the root; per class how many images and how far from the
originals (variations of them, interpolations between them, prior samples); a preview; the set
written by ``pixgen synth`` (optionally with its evaluation)."""

from pathlib import Path

import streamlit as st

from pixgen.io import SetManifest, load_image
from pixgen.synth import cut_reference_tiles, load_spec, run_synth
from studio import core, jobs

SOURCES = {"variations": "variations of its images", "interpolations": "interpolations between its images",
           "prior": "prior samples of its label"}

st.header("Augment")
core.cancelled_notice()


def write_spec(folder: Path, model: str, plan: dict, preview: bool, seed: int, steps: int, guidance: float) -> Path:
    """The spec for ``plan`` (class -> settings) in ``folder``; a preview keeps 2 images per class."""
    classes = {}
    for name, p in plan.items():
        count = min(2, p["count"]) if preview else p["count"]
        originals = jobs.pick_originals(p["images"], p["originals"], seed, folder / "originals" / name)
        if p["source"] == "variations":  # references at the model's size and mpp: img2img starts from them
            tiles = folder / "tiles" / name
            cut_reference_tiles(sorted(originals.iterdir()), tiles, size=gen.config["image_size"],
                                mpp=gen.config.get("mpp") or source_mpp, source_mpp=source_mpp)
            classes[name] = {"count": count, "reference": str(tiles),
                             **({"strength": p["strength"]} if p["strength"] < 1 else {})}
        elif p["source"] == "interpolations":
            emb = jobs.interpolated_embeddings(gen, sorted(originals.iterdir()), p["count"], p["mix"], seed,
                                               folder / f"{name}.safetensors")
            classes[name] = {"count": count, "embeddings": str(emb)}
        else:
            classes[name] = {"count": count, "label": name}
    spec = folder / "spec.toml"
    spec.write_text(jobs.synth_spec_text(model, classes, seed=seed, steps=steps, guidance=guidance))
    return spec


def run(preview: bool) -> None:
    st.session_state.pop("augment_out", None)  # a run cancelled or refused shows no earlier set as its result
    folder = core.new_run_folder("augment")
    folder.mkdir()
    spec = write_spec(folder, core.model_path(source), plan, preview, seed, steps, guidance)
    argv = ["synth", spec, "--out", folder / "set", "--no-progress"]
    if evaluate and not preview:
        argv += ["--eval", core.under_root(real, "real image folder"), "--eval-max-images", 200, "--eval-utility", "none"]
    with core.running(f"cancel_augment_{preview}", jobs.synth_steps(load_spec(spec), steps)) as progress:
        run_synth(jobs.cli_args(argv), callback=progress)
    st.session_state["augment_out"] = str(folder / "set")


with core.shown_errors():
    source, token = core.model_picker()
    gen = core.load_generator(source, token)
    labels = set(gen.labels)
    text = st.text_input("Labelled folder (class sub-folders, under the data root)", "lc25000-lung", key="aug_folder")
    classes = jobs.class_folders(core.under_root(text))
    plan = {}
    for name, images in classes.items():
        with st.expander(f"{name}: {len(images)} images", expanded=True):
            c1, c2, c3, c4, c5 = st.columns(5)
            options = [k for k in SOURCES if k != "prior" or name in labels]
            kind = c1.selectbox("Source", options, format_func=SOURCES.get, key=f"aug_src_{name}",
                                help="prior samples need a class named like a model label (`pixgen info`)")
            count = c2.number_input("Images", 1, 100000, 8, key=f"aug_n_{name}")
            originals = c3.number_input("Originals used", 1, len(images), min(16, len(images)), key=f"aug_orig_{name}",
                                        disabled=kind == "prior")
            strength = c4.slider("Variation strength", 0.05, 1.0, 1.0, step=0.05, key=f"aug_strength_{name}",
                                 disabled=kind != "variations",
                                 help="how far from the original: img2img from its tile (0.3 stays close to it; "
                                      "1 = from noise, only its embedding is kept)")
            mix = c5.slider("Interpolation distance", 0.0, 0.5, 0.25, key=f"aug_mix_{name}",
                            disabled=kind != "interpolations",
                            help="interpolation weight towards a second image of the class (0: the first image's embedding)")
            plan[name] = {"images": images, "source": kind, "count": count, "originals": originals, "mix": mix,
                          "strength": strength}
    model_mpp = gen.config.get("mpp")
    source_mpp = st.number_input(
        "Resolution of the originals (um/px)", 0.05, 10.0, float(model_mpp or 0.5), step=0.05, key="aug_mpp",
        help=f"variations are cut from the originals into {gen.config['image_size']} px tiles at the model's "
             f"{model_mpp} um/px; LC25000 is taken as 0.5, a 40x scan is about 0.25")
    c1, c2, c3 = st.columns(3)
    steps = c1.number_input("Steps", 1, 200, int(gen.config["num_inference_steps"]), key="aug_steps")
    guidance = c2.number_input("Guidance", 0.0, 20.0, float(gen.config["guidance_scale"]), step=0.25)
    seed = c3.number_input("Seed", 0, 2**53 - 1, 0)
    evaluate = st.checkbox("Evaluate the set against real held-out images (`pixgen eval`)", key="aug_eval")
    real = st.text_input("Real held-out folder (under the data root)", key="aug_real") if evaluate else ""
    c1, c2 = st.columns(2)
    if c1.button("Preview (2 per class)", key="aug_preview"):
        run(preview=True)
    if c2.button("Write the set (pixgen synth)", type="primary", key="aug_go"):
        run(preview=False)

if "augment_out" in st.session_state:
    with core.shown_errors():
        out = Path(st.session_state["augment_out"])
        manifest = SetManifest.load(out)
        st.subheader(f"{len(manifest.files)} images in {len(manifest.spec['classes'])} classes")
        strengths = {c["name"]: c.get("strength") for c in manifest.spec["spec"]["classes"]}
        st.table([{"class": name, "images": c["count"], "source": c["kind"],
                   "strength": f"{strengths.get(name) or 1:g}" if c["kind"] == "reference" else ""}
                  for name, c in manifest.spec["classes"].items()])
        paths = manifest.image_paths(out)
        cols = st.columns(6)
        for i, (path, entry) in enumerate(zip(paths[:48], manifest.files)):
            cols[i % 6].image(load_image(path), caption=f"{entry.file} · {entry.condition.kind}")
        if (out / "eval" / "report.md").is_file():
            with st.expander("Evaluation report", expanded=True):
                core.show_report(out / "eval")
        st.download_button("Download the set (zip: class folders, manifest.json, spec)", core.zip_folder(out),
                           file_name=f"pixgen-synth-{out.parent.name}.zip", mime="application/zip")
