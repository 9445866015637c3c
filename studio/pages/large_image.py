"""Large image: a layout (a label, a slide region under the root, a painted class map), a size;
progress over the windows; a zoomable viewer of the pyramidal OME-TIFF; its download."""

from pathlib import Path

import streamlit as st

from pixgen.commands_large import _layout
from pixgen.io.slides import open_slide
from pixgen.large import generate_large
from studio import core, jobs

st.header("Large image")
core.cancelled_notice()
with core.shown_errors():
    source, token = core.model_picker()
    gen = core.load_generator(source, token)
    labels = gen.labels
    how = st.radio("Layout", ["a label", "a slide region", "a painted class map"], horizontal=True, key="large_how")
    argv = ["large", "--model", core.model_path(source)]
    if how == "a label":
        c1, c2 = st.columns(2)
        argv += ["--label", c1.selectbox("Label", labels, key="large_label"),
                 "--size", c2.number_input("Size (px, square)", 64, 8192, 512, step=64, key="large_size")]
    elif how == "a slide region":
        slide = st.text_input("Slide (under the data root)", "slides/cmu-1-small-region.svs", key="large_slide")
        region = st.text_input("Region x,y,w,h (level-0 px)", "500,1000,512,512", key="large_region")
        argv += ["--from-slide", core.under_root(slide, "slide"), "--region", region]
    else:
        upload = st.file_uploader("Class map (a small PNG: one pixel per model window)", type=["png"], key="large_map")
        colours = st.text_area("Colours, one per line: R,G,B=label", "255,0,0=lung_scc\n0,0,255=lung_n", key="large_colours")
        if upload:
            argv += ["--label-map", core.save_upload(upload, "label-maps"), "--colours",
                     *[line.strip() for line in colours.splitlines() if line.strip()]]
    c1, c2, c3 = st.columns(3)
    steps = c1.number_input("Steps", 1, 200, int(gen.config["num_inference_steps"]), key="large_steps")
    guidance = c2.number_input("Guidance", 0.0, 20.0, float(gen.config["guidance_scale"]), step=0.25)
    seed = c3.number_input("Seed", 0, 2**53 - 1, 0)
    missing = how == "a painted class map" and "--label-map" not in argv
    if st.button("Generate the large image", type="primary", disabled=missing, key="large_go"):
        out = core.new_run_folder("large") / "large.ome.tiff"
        args = jobs.cli_args([*argv, "--steps", steps, "--guidance", guidance, "--seed", seed, "--out", out])
        layout, _, size = _layout(args, gen)
        height, width = size or layout.size
        total = jobs.large_model_calls(gen, height, width, steps, args.batch_size)
        with core.running("cancel_large", total, "windows x steps") as progress, core.count_model_calls(progress):
            summary = generate_large(gen, layout, out, height=height, width=width, num_inference_steps=steps,
                                     guidance_scale=guidance, seed=seed, batch_size=args.batch_size, progress=False)
        st.session_state["large_out"] = str(out)
        st.session_state["large_summary"] = summary

if "large_out" in st.session_state:
    with core.shown_errors():
        out = Path(st.session_state["large_out"])
        with open_slide(out) as slide:
            dims = slide.level_dimensions
            st.subheader(f"{dims[0][0]} x {dims[0][1]} px, {len(dims)} levels")
            st.caption(" · ".join(f"{k}: {v:.1f}" if isinstance(v, float) else f"{k}: {v}"
                                  for k, v in st.session_state["large_summary"].items()))
            level = st.select_slider("Zoom (pyramid level; 0 = full resolution)", options=list(range(len(dims)))[::-1],
                                     value=len(dims) - 1, key="large_level")
            w, h = dims[level]
            view = 512
            c1, c2 = st.columns(2)
            cx = c1.slider("Centre x (%)", 0, 100, 50, key="large_cx") / 100
            cy = c2.slider("Centre y (%)", 0, 100, 50, key="large_cy") / 100
            vw, vh = min(view, w), min(view, h)
            x, y = round(cx * (w - vw)), round(cy * (h - vh))
            scale = dims[0][0] / w
            st.image(slide.read(round(x * scale), round(y * scale), level, vw, vh),
                     caption=f"level {level} ({scale:g}x down), x={x} y={y}, {vw}x{vh} px")
        st.download_button("Download the OME-TIFF", out.read_bytes(), file_name=out.name, mime="image/tiff")
