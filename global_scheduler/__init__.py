"""The global scheduler: arrival-rate estimation, confidence tuning and reserve coordination
across replicas (DESIGN section 2). Not built yet: see issues 3 and 5."""
