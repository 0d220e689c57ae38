"""Datasets: discovery of user layouts, the preprocessing cache and the built-in synthetic cohort."""
