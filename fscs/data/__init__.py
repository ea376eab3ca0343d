"""Datasets: readers by layout, the image index, folds and episode sampling."""
