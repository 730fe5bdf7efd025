"""The global scheduler: arrival-rate estimation and confidence tuning (confidence.py), and,
with issue 5, reserve coordination across replicas and the Ray actor around them."""
