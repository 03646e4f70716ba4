"""Media: ffmpeg discovery, probing, PeerTube's encoding rules, command builders and a supervised ffmpeg run.

It knows nothing about HTTP or jobs: processors give it files and settings, it gives back files or a
`MediaError`. Modules: `binaries` (find and check ffmpeg), `probe` (+ `probe_worker`, the sandboxed PyAV
process of each probe, forked by `probe_server`, reached through `probe_client`), `profiles` (bitrate,
audio, fps, ladder, storyboard rules), `commands` (argument lists), `hls_playlist`, `progress` (parse
`-progress`), `process` (`run_ffmpeg`: watchdog, kill on cancel), `samples` (generated test clips),
`errors`. Import what you need from those modules.
"""
