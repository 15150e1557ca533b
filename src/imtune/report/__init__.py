"""The comparison report: verdict and checks, the page, its plots, Markdown/HTML rendering."""
