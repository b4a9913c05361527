"""Private hyper-parameter search, `python -m dpjax.tune` (`__main__.py`).

`space` reads and draws the search space, `search` runs, resumes and
accounts the search (privacy/tuning.py), `report` writes the release, the
operator's table and plot.
"""
