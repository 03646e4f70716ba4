"""The runner daemon: takes jobs from PeerTube instances and coordinators, runs them, never gets stuck."""
