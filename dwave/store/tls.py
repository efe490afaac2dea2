"""Per-job TLS credentials for a Dask cluster that listens beyond this machine.

A scheduler on a cluster node must accept connections from the worker nodes, so it cannot stay
on loopback; a plain-TCP one would run the code of anyone who connects (`Client(addr).run(...)`)
as the job's user. So every such cluster dwave starts speaks TLS with a key made for that job
alone: Dask's servers require a client certificate signed by the job's CA (mutual TLS), and only
the job's own processes hold the key, written in a directory only the user can read.

    python -m dwave.store.tls DIR     writes DIR/{ca,cert,key}.pem (DIR made 0700, files 0600) and
                                prints the `export` lines that give them to every Dask process
                                (scheduler, workers, the dwave client) through Dask's
                                configuration; slurm/preprocess.sbatch evals them.

`--cluster slurm` writes them the same way into a private directory beside the worker logs and
gives them to dask-jobqueue (dwave/store/cluster.py); dask-cloudprovider's EC2 clusters make theirs
by default.
"""

from __future__ import annotations

import os
import shlex
import sys

FILES = {"ca": "ca.pem", "cert": "cert.pem", "key": "key.pem"}


def write_credentials(directory: str) -> dict[str, str]:
    """A fresh self-signed key and certificate (the CA of one job) in `directory`; returns
    their paths ("ca", "cert", "key")."""
    from distributed.security import Security

    temporary = Security.temporary()
    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.chmod(directory, 0o700)  # an existing directory too: the key must not be readable
    contents = {"ca": temporary.tls_ca_file, "cert": temporary.tls_scheduler_cert,
                "key": temporary.tls_scheduler_key}
    paths = {}
    for role, name in FILES.items():
        path = paths[role] = os.path.join(directory, name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with open(fd, "w") as f:
            f.write(contents[role])
    return paths


def security(paths: dict[str, str]):
    """The Security of every role of the job (the same key and certificate for all)."""
    from distributed.security import Security

    return Security(tls_ca_file=paths["ca"], require_encryption=True,
                    **{f"tls_{role}_{part}": paths[part] for role in ("scheduler", "worker",
                                                                      "client")
                       for part in ("cert", "key")})


def environment(paths: dict[str, str]) -> dict[str, str]:
    """The Dask configuration variables that make every Dask process use them and refuse
    plain TCP."""
    variables = {"DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True",
                 "DASK_DISTRIBUTED__COMM__TLS__CA_FILE": paths["ca"]}
    for role in ("SCHEDULER", "WORKER", "CLIENT"):
        variables[f"DASK_DISTRIBUTED__COMM__TLS__{role}__CERT"] = paths["cert"]
        variables[f"DASK_DISTRIBUTED__COMM__TLS__{role}__KEY"] = paths["key"]
    return variables


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m dwave.store.tls DIR  (writes DIR/{ca,cert,key}.pem; prints the "
              "export lines for Dask)", file=sys.stderr)
        return 2
    for name, value in environment(write_credentials(argv[0])).items():
        print(f"export {name}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
