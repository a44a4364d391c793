"""Worker side: what a training or inference process uses to fetch rows ahead of the layer.

fetcher (one layer ahead, pushes in the background), cache (the worker's hot-row cache),
nodelocal (rows shared by the workers of one node through shared memory).
"""
