"""Paint: draw nuclei and their classes (or load a mask, or sample one), generate matching tissue,
see mask | image side by side, export the pairs (images/, inst/, types/, manifest)."""

from pathlib import Path

import streamlit as st
from streamlit_drawable_canvas import st_canvas

from pixgen.io import SetManifest, load_image
from pixgen.mask_sampler import MaskSampler
from pixgen.masks import BUNDLED_MASK_MODEL, load_layout, load_layouts, mask_control_scale
from studio import core, jobs
from studio.canvas import CLASS_COLOURS, layout_from_canvas

CANVAS_PX = 384

st.header("Paint")
core.cancelled_notice()
with core.shown_errors():
    source, token = core.model_picker()
    gen = core.load_generator(source, token)
    size = int(gen.config["image_size"])
    how = st.radio("Layout", ["draw", "load a mask", "sample"], horizontal=True, key="paint_how")
    layouts = None
    if how == "draw":
        left, right = st.columns([1, 2])
        klass = left.radio("Nucleus class", list(CLASS_COLOURS), help="each circle is one nucleus of this class")
        left.caption(f"Drag circles on the canvas ({CANVAS_PX} px shows the model's {size} px tile).")
        with right:
            drawing = st_canvas(fill_color=CLASS_COLOURS[klass], stroke_width=0, background_color="#000000",
                                drawing_mode="circle", width=CANVAS_PX, height=CANVAS_PX, key="paint_canvas")
        if drawing.json_data and drawing.json_data.get("objects"):
            layouts = [layout_from_canvas(drawing.json_data, CANVAS_PX, size)]
    elif how == "load a mask":
        upload = st.file_uploader("Mask (instance PNG, CoNSeP types, palette colours or binary)", type=["png", "tif", "tiff"],
                                  key="paint_mask")
        fmt = st.selectbox("Format", ["guess", "instance", "types", "colour", "binary"])
        if upload:
            path = core.save_upload(upload, "masks")
            layouts = load_layouts(path, None if fmt == "guess" else fmt)
    else:
        c1, c2 = st.columns(2)
        tissue = c1.selectbox("Tissue statistics", ["consep", "monuseg"])
        count = c2.number_input("Layouts", 1, 16, 1, key="paint_layouts")
        sampler = MaskSampler.from_json(BUNDLED_MASK_MODEL / "mask_stats.json", tissue)
        layouts = [sampler.sample(int(st.session_state.get("paint_seed", 0)) + i) for i in range(count)]
    labels = gen.labels
    c1, c2, c3, c4, c5 = st.columns(5)
    label = c1.selectbox("Tissue label", labels, index=labels.index("consep") if "consep" in labels else 0)
    n = c2.number_input("Images per layout", 1, 16, 1, key="paint_n")
    seed = c3.number_input("Seed", 0, 2**53 - 1, 0, key="paint_seed")
    steps = c4.number_input("Steps", 1, 200, int(gen.config["num_inference_steps"]), key="paint_steps")
    scale = c5.number_input("Mask strength", 0.0, 3.0, mask_control_scale(BUNDLED_MASK_MODEL), step=0.1,
                            help="the ControlNet's scale; the default is the mask model's calibrated one (docs/masks.md)")
    if st.button("Generate tissue", type="primary", disabled=layouts is None, key="paint_go"):
        st.session_state.pop("paint_out", None)  # a run cancelled or refused shows no earlier pairs as its result
        folder = core.new_run_folder("paint")
        masks = jobs.save_layout(layouts[0], folder / "input") if how == "draw" else folder / "input"
        if how != "draw":
            for lay in layouts:
                jobs.save_layout(lay, masks)
        args = jobs.cli_args(["generate", "--model", core.model_path(source), "--mask", masks, "--n", n,
                              "--seed", seed, "--steps", steps, "--control-scale", scale, "--out", folder / "pairs"])
        args.control_image = [str(masks)]  # recorded in the manifest as the set's control input
        total = -(-len(layouts) * n // args.batch_size) * steps
        with core.running("cancel_paint", total) as progress:
            st.session_state["paint_out"] = str(jobs.mask_pairs(gen, args, load_layouts(masks), label, callback=progress))

if "paint_out" in st.session_state:
    with core.shown_errors():
        out = Path(st.session_state["paint_out"])
        manifest = SetManifest.load(out)
        st.subheader(f"{len(manifest.files)} mask | image pairs")
        for entry in manifest.files:
            types = out / "types" / Path(entry.control_image).name
            lay = load_layout(out / entry.control_image, "instance", types if types.is_file() else None)
            c1, c2 = st.columns(2)
            c1.image(jobs.layout_image(lay), caption=f"mask {entry.control_image}", width=256)
            c2.image(load_image(out / entry.file), caption=f"{entry.file} · seed {entry.seed}", width=256)
        st.download_button("Export the pairs (zip: images/, inst/, types/, manifest.json)", core.zip_folder(out),
                           file_name=f"pixgen-pairs-{out.name}.zip", mime="application/zip")
