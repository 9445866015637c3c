"""The studio's entry script (``pixgen studio`` runs ``streamlit run`` on it): one page per capability."""

from pathlib import Path

import streamlit as st

from studio import core

PAGES = Path(__file__).parent / "pages"

st.set_page_config(page_title="pixgen studio", layout="wide")
navigation = st.navigation([
    st.Page(PAGES / "generate.py", title="Generate", default=True),
    st.Page(PAGES / "paint.py", title="Paint"),
    st.Page(PAGES / "augment.py", title="Augment"),
    st.Page(PAGES / "large_image.py", title="Large image"),
    st.Page(PAGES / "stain.py", title="Stain"),
    st.Page(PAGES / "explore.py", title="Explore"),
])
with st.sidebar:
    st.caption(f"data root: `{core.settings().root}`")
navigation.run()
