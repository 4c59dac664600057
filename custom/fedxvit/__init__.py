"""fedxvit: federated transfer learning of a hybrid CNN-ViT brain-MRI classifier on NVFlare.

This package is what NVFlare's server and a hospital's client load, and nothing else (desk tooling lives in the
checkout's tooling/). Each module has one role; a site module never imports a server module nor the reverse, and
shared modules import only shared ones (tests/test_roles.py checks the sources, lazy imports included;
tests/test_packaging.py what each side of every job loads from the wheel). Four command lines stay here because
they run where only the wheel is installed: `python -m fedxvit.site_policy` (a hospital allows fedxvit's classes),
`python -m fedxvit.he decrypt` (a hospital reads the HE global model with its own key),
`python -m fedxvit.run_record` (the server's operator records a run folder) and
`python -m fedxvit.flower_server install` (the server's operator pre-deploys the Flower app).
"""

SHARED_MODULES = (
    "protocol",  # the names both sides exchange: meta keys, headers, the site's public property, tracked metrics
    "methods",  # the one registry of jobs and methods: job generator, site strategies and comparisons derive from it
    "errors",
    "paths",
    "classes",
    "model",
    "checkpoint",
    "imbalance",  # Balanced Softmax and MAS factors (site) and MAS weights (server): plain torch/numpy
    "fedsm",  # FedSM's models and their arithmetic: the site trains them, the server combines them
)
SITE_MODULES = (
    "executor",
    "algorithms",
    "training",
    "data",
    "datalist",
    "sites",
    "site_policy",
    "site_stats",
    "frozen_tensors",
    "privacy",
    "explain",
    "site_scores",
    "ssl_prior",
    "flower_client",  # the Flower app's ClientApp (fedxvit/flower_app)
)
SERVER_MODULES = (
    "aggregation",
    "server_algorithms",
    "filters",
    "downlink",
    "persistor",
    "widgets",
    "receivers",
    "tracking",
    "run_record",
    "evaluation",
    "he",
    "flower_server",  # the Flower app's ServerApp, and pre-deploying the app at an NVFlare server
)
