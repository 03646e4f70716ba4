"""One-shot mode: `tuberunner transcode INPUT -o OUT` runs a coordinator and runners in one process."""
