"""The coordinator: the server side of PeerTube's runner protocol, plus admin and ingest APIs."""
