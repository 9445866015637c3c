"""Explore: open an evaluation report (its tables and plots), and browse a synthetic set next to the
real one on an embedding map with thumbnails and clusters: what the generator covers and misses."""

from pathlib import Path

import altair as alt
import pandas as pd
import streamlit as st

from metrics.detectors import get_detector
from metrics.images import load_image_folder
from studio import core
from studio.embedding_map import embedding_map, thumbnail_uri


@st.cache_resource(scope="session", show_spinner="loading the detector ...")
def detector(name: str):
    return get_detector(name)


st.header("Explore")
report_tab, map_tab = st.tabs(["Evaluation report", "Embedding map"])
with report_tab, core.shown_errors():
    text = st.text_input("Report folder (under the data root)", key="explore_report")
    if text:
        core.show_report(core.under_root(text, "report folder"))

with map_tab, core.shown_errors():
    real_text = st.text_input("Real images (folder under the data root)", key="explore_real")
    sets = {"a folder under the data root": None, **{f"this session's last {k} set": st.session_state[f"{k}_out"]
                                                     for k in ("generate", "augment") if f"{k}_out" in st.session_state}}
    which = st.selectbox("Synthetic images", list(sets), key="explore_which")
    syn_text = st.text_input("Synthetic images (folder under the data root)", key="explore_syn") if sets[which] is None else ""
    c1, c2, c3 = st.columns(3)
    name = c1.selectbox("Feature space", ["encoder:pixgen-ssl", "random-conv"], key="explore_detector")
    most = c2.number_input("At most images per set", 10, 5000, 200, key="explore_max")
    k = c3.number_input("Clusters", 2, 50, 8, key="explore_k")
    if st.button("Build the map", type="primary", key="explore_go"):
        real = load_image_folder(core.under_root(real_text, "real image folder"), max_images=most)
        syn = load_image_folder(Path(sets[which]) if sets[which] else core.under_root(syn_text, "synthetic image folder"),
                                max_images=most)
        with st.spinner("embedding and clustering ..."):
            st.session_state["explore_map"] = (embedding_map(real.images, syn.images, detector(name), clusters=k),
                                               real.images + syn.images, real.paths + syn.paths)

    if "explore_map" in st.session_state:
        emap, images, paths = st.session_state["explore_map"]
        frame = pd.DataFrame({"x": emap.xy[:, 0], "y": emap.xy[:, 1], "cluster": emap.cluster.astype(str),
                              "set": ["synthetic" if s else "real" for s in emap.synthetic],
                              "file": [Path(p).name for p in paths], "image": [thumbnail_uri(im) for im in images]})
        chart = alt.Chart(frame).mark_point(filled=True, size=60).encode(
            x="x", y="y", color="cluster", shape="set", tooltip=["set", "cluster", "file", "image"]).interactive()
        st.altair_chart(chart, width="stretch")
        table = emap.table()
        st.caption("Clusters from least to most covered (coverage: synthetic share / the set's share; 0 = missed).")
        st.dataframe(pd.DataFrame(table), hide_index=True)
        pick = st.selectbox("Browse cluster", [r["cluster"] for r in table], key="explore_cluster")
        for label, flag in (("real", False), ("synthetic", True)):
            members = [i for i in range(len(images)) if emap.cluster[i] == pick and emap.synthetic[i] == flag][:24]
            st.markdown(f"**{label}** ({len(members)} shown)")
            if members:
                st.image([images[i] for i in members], width=96, caption=[Path(paths[i]).name for i in members])
