"""Federated training on Flower (docs/federated.md): clients train with leantrain's own Trainer on their
partition of a token dataset; the server aggregates with Flower's strategies (FedAvg, FedProx, FedAdam,
FedYogi), optionally with client-level differential privacy or secure aggregation (SecAgg+), and keeps the
global model as a leantrain run.

    partition.py  iid / natural / Dirichlet partitions, written as one token dataset per client
    client.py     the ClientApp: local_steps of the Trainer's train step per round
    server.py     the round loop over a Flower strategy: val_loss, checkpoints, accounting, resume
    privacy.py    Flower's DP wrapper and accountant (epsilon at delta)
    secure.py     SecAgg+ rounds: Flower's SecAggPlusWorkflow driven one round at a time (server sees the sum)
    run.py        claim the run directory, partitions, the simulation engine
    app.py        the ServerApp / ClientApp for the deployment engine (`flwr run`)
    deploy.py     the app folder `flwr run` submits
"""
