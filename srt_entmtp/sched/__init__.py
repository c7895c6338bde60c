"""Scheduling: requests, admission, chunked prefill, continuous batching."""
