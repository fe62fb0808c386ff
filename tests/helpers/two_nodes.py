"""Train stage 0 across two Ray nodes on one machine (ray.cluster_utils.Cluster), one worker per node,
checkpointing to the storage path given on the command line. Prints the summary as JSON on its last line.

    python tests/helpers/two_nodes.py <stage0 config> key=value ...
"""

import json
import sys

import ray
from ray.cluster_utils import Cluster


def main(config: str, overrides: list[str]) -> None:
    from app.config import load_config
    from app.train.launcher import run_stage

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "include_dashboard": False})
    cluster.add_node(num_cpus=3)
    cluster.wait_for_nodes()
    try:
        ray.init(address=cluster.address, runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        cfg = load_config(config, [*overrides, "scaling.num_workers=2", "scaling.placement_strategy=STRICT_SPREAD"])
        summary = run_stage(cfg)
        summary["nodes"] = nodes
        print(json.dumps(summary, default=str))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
