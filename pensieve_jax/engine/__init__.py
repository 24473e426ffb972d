"""The engine layer: requests, the scheduler, the step loop, sampling, statistics."""
