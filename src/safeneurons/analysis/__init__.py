"""Analysis of results: mask and weight comparison, the study's statistics and plots."""
