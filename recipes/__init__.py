"""The bundled models' recipes: how ``pixgen/weights`` were trained (``recipes.default_models``)
and how their quality report was measured (``recipes.default_report``).

Recipes sit above every other package (they may use pixgen, training and metrics; nothing
imports them). Run them as ``python -m recipes.default_models`` / ``python -m recipes.default_report``.
"""
