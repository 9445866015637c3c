"""The Streamlit studio (``pixgen studio``): pages over ``pixgen`` and ``metrics``, nothing of its own logic.

``studio.app`` is the entry script and ``studio/pages/`` holds one Streamlit script per page;
``studio.core`` adapts the library to Streamlit (settings, session folders, cached models,
progress, errors), ``studio.jobs`` composes library calls for the pages, ``studio.canvas`` reads
the Paint canvas, ``studio.embedding_map`` builds the Explore page's map. See docs/studio.md.
"""
