"""Desk tooling, run from the checkout (`python -m tooling.<module>`), never shipped to a hospital: expert and
transfer training, the baselines, the job definitions, the simulator runner, the POC driver, the prior's
pretraining and the job-folder reader. NVFlare's server and sites load only `custom/fedxvit`."""
