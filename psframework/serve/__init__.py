"""``ps-serve``: serve a model while it trains, or from an exported file (extras ``serve``).

- ``model``: the two copies of the model and where their weights come from (a job, a file);
- ``payload``: what ``POST /predict`` takes and answers (JSON, or safetensors);
- ``batching``: concurrent requests answered by one forward pass;
- ``replica``: one model process's HTTP service; ``front``: N replicas behind one front that
  routes by load and restarts replicas that die;
- ``cli``: the ``ps-serve`` command.
"""
