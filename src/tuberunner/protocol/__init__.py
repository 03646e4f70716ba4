"""Wire vocabulary shared by the runner and the coordinator: job types, states, error codes, payloads.

Nothing in here does I/O; both sides import these names so that a string on the wire is spelled once.
"""
