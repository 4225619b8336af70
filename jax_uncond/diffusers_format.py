"""The diffusers release whose folder formats this package reads and writes.

`config.json`, `scheduler_config.json` and `model_index.json` written here carry it as
`_diffusers_version`; it is the release the tests were checked against.
"""

DIFFUSERS_VERSION = "0.42.1"
