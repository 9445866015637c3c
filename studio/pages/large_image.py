"""Large image: a layout (a label, a slide region under the root, a painted class map), a size;
progress over the windows; a zoomable viewer of the pyramidal OME-TIFF; its download."""

from pathlib import Path

import streamlit as st

from pixgen.commands_large import parse_colours, parse_region
from pixgen.io.slides import open_slide
from pixgen.large import build_layout, generate_large
from studio import core, jobs
from studio.viewer import pyramid_tiles, viewer_html

st.header("Large image")
core.cancelled_notice()
with core.shown_errors():
    source, token = core.model_picker()
    gen = core.load_generator(source, token)
    labels = gen.labels
    how = st.radio("Layout", ["a label", "a prompt", "a slide region", "a painted class map"], horizontal=True,
                   key="large_how")
    source_kw = {}  # what pixgen.large.build_layout builds the layout from
    if how == "a label":
        c1, c2 = st.columns(2)
        size = c2.number_input("Size (px, square)", 64, 8192, 512, step=64, key="large_size")
        source_kw = {"label": c1.selectbox("Label", labels, key="large_label"), "size": (size, size)}
    elif how == "a prompt":
        c1, c2 = st.columns(2)
        size = c2.number_input("Size (px, square)", 64, 8192, 512, step=64, key="large_prompt_size")
        prompt = c1.text_input("Prompt", "colon, inflammatory-rich", help="the prior's vocabulary: `pixgen info`",
                               key="large_prompt")
        source_kw = {"prompt": prompt, "size": (size, size)}
    elif how == "a slide region":
        slide = st.text_input("Slide (under the data root)", "slides/cmu-1-small-region.svs", key="large_slide")
        region = st.text_input("Region x,y,w,h (level-0 px)", "500,1000,512,512", key="large_region")
        source_kw = {"slide": core.under_root(slide, "slide"), "region": parse_region(region)}
    else:
        upload = st.file_uploader("Class map (a small PNG: one pixel per model window)", type=["png"], key="large_map")
        colours = st.text_area("Colours, one per line: R,G,B=label or R,G,B=prompt", "255,0,0=lung_scc\n0,0,255=lung_n",
                               key="large_colours")
        if upload:
            source_kw = {"label_map": core.save_upload(upload, "label-maps"),
                         "colours": parse_colours([line.strip() for line in colours.splitlines() if line.strip()])}
    c1, c2, c3 = st.columns(3)
    steps = c1.number_input("Steps", 1, 200, int(gen.config["num_inference_steps"]), key="large_steps")
    guidance = c2.number_input("Guidance", 0.0, 20.0, float(gen.config["guidance_scale"]), step=0.25)
    seed = c3.number_input("Seed", 0, 2**53 - 1, 0)
    if st.button("Generate the large image", type="primary", disabled=not source_kw, key="large_go"):
        st.session_state.pop("large_out", None)  # a run cancelled or refused shows no earlier image as its result
        out = core.new_run_folder("large") / "large.ome.tiff"
        layout, _ = build_layout(gen, seed=seed, **source_kw)
        height, width = source_kw.get("size") or layout.size
        total = jobs.large_model_calls(gen, height, width, steps)
        with core.running("cancel_large", total, "windows x steps") as progress:
            summary = generate_large(gen, layout, out, height=height, width=width, num_inference_steps=steps,
                                     guidance_scale=guidance, seed=seed, progress=False, callback=progress)
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
            levels = pyramid_tiles(slide)
            st.html(viewer_html(levels, dims[0], slide.mpp()), unsafe_allow_javascript=True)
            finest = levels[-1]
            st.caption(f"Pan / zoom viewer over the OME-TIFF's pyramid: levels {', '.join(str(lv.index) for lv in levels)} "
                       f"embedded, {sum(len(r) for lv in levels for r in lv.tiles)} tiles"
                       + ("" if finest.index == 0 else f"; past level {finest.index} ({finest.downsample:g}x down) the "
                          "view is upsampled, the download holds every pixel"))
        st.download_button("Download the OME-TIFF", out.read_bytes(), file_name=out.name, mime="image/tiff")
