"""The machinery the jobs share, in rooms: runtime/ (device, precision, processes, signals), infer/ (checkpoint ->
model -> captions, the one decode path, feature extraction), train/ (the training step, losses, schedules, run
state, validation), outputs/ (captions files, gallery) and serve/ (HTTP app, page, batcher)."""
