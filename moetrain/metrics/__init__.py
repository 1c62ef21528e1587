"""Layer 8, metrics: what a run measures and where it goes. Routing statistics, W&B and run-folder
tracking, the run report and the sweep report.

It may import every layer below it (config .. surgery).
"""
