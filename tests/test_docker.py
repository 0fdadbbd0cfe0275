"""Static checks of docker/: no container engine, cluster or network is needed.

Every YAML parses and has the structure its tool needs (RayJob, RayCluster, compose, the
training Job, the accelerate config through accelerate's own loader); every command line
written in docker/ (YAML strings, the Dockerfile, the sbatch script, commands in comments
and in the README's code blocks) is parsed by the real parser of its program: `pipeline`
and `train` (argparse, with `train run` overrides checked against the config schema),
`accelerate launch`, `torchrun`, `ray` (click); every repository path and `-m` module
named there exists; the Dockerfile installs the project as the Makefile does.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import importlib.util
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
APP = "/app"                       # the repository's place in the image (WORKDIR)

# docker/'s own files: not compose's default data directory or token file
TEXT_FILES = sorted(p for p in DOCKER.rglob("*") if p.is_file() and p.name != ".env"
                    and p.relative_to(DOCKER).parts[0] != "data")
YAML_FILES = [p for p in TEXT_FILES if p.suffix in (".yaml", ".yml")]


def _load(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _docs(kind: str) -> list[tuple[Path, dict]]:
    return [(p, d) for p in YAML_FILES for d in _load(p)
            if isinstance(d, dict) and d.get("kind") == kind]


def _one(kind: str) -> dict:
    docs = _docs(kind)
    assert len(docs) == 1, f"expected one {kind} in docker/, found {len(docs)}"
    return docs[0][1]


def _dockerfile_arg(name: str) -> str:
    m = re.search(rf"^ARG {name}=(\S+)", DOCKERFILE.read_text(), re.M)
    assert m, f"docker/Dockerfile has no default for ARG {name}"
    return m.group(1).strip('"')


def _dockerfile_env(name: str) -> str:
    m = re.search(rf"^\s*(?:ENV\s+)?{name}=(\S+)", DOCKERFILE.read_text(), re.M)
    assert m, f"docker/Dockerfile sets no {name}"
    return m.group(1)


# ---------------------------------------------------------------- command lines

SEPARATORS = set(";&|\n")
PROGRAMS = {"pipeline", "train", "accelerate", "torchrun", "ray", "hf",
            "python", "python3", "python3.12"}
# first words of a command written in a comment or a README code block
STARTERS = PROGRAMS | {"docker", "kubectl", "sbatch", "srun", "exec"}


def _words(text: str) -> list[str]:
    """Shell words of `text`; ; & | and newlines come out as separator tokens."""
    lex = shlex.shlex(text.replace("\\\n", " "), posix=True, punctuation_chars=";&|\n")
    lex.whitespace = " \t\r"
    lex.whitespace_split = True
    return list(lex)


def _invocations(text: str) -> list[tuple[str, list[str]]]:
    """(program, argv) of every call of a PROGRAMS member in shell text, quoted scripts
    (bash -c '...') included. A program name right after an option is its value
    (`--split train`), not a call."""
    toks = _words(text)
    found = []
    for i, tok in enumerate(toks):
        if any(c.isspace() for c in tok.strip()):
            found += _invocations(tok)
            continue
        prog = tok.rsplit("/bin/", 1)[-1]          # /opt/venv/bin/ray, .venv/bin/train
        prev = toks[i - 1] if i else ""
        if prog not in PROGRAMS or (prev.startswith("-") and prev != "--"):
            continue
        argv = []
        for t in toks[i + 1:]:
            if set(t) <= SEPARATORS or re.match(r"\d*[<>]", t):   # end, or a redirection
                break
            argv.append(t)
        if argv:
            found.append((prog, argv))
    return found


def _command_lines(text: str, indent: int = 0) -> list[str]:
    """Commands quoted in comments or code blocks: lines indented by at least `indent`
    that start with a known command (or VAR=value assignments before one), with their
    backslash continuations."""
    out, cur = [], None
    for raw in text.splitlines():
        line = raw.strip()
        if cur is not None:
            cur += " " + line.rstrip("\\")
            if not line.endswith("\\"):
                out.append(cur)
                cur = None
            continue
        first = re.sub(r"^(?:[A-Z_]+=\S+\s+)+", "", line).split(" ", 1)[0]
        if first in STARTERS and len(raw) - len(raw.lstrip(" ")) >= indent:
            if line.endswith("\\"):
                cur = line.rstrip("\\")
            else:
                out.append(line)
    if cur is not None:
        out.append(cur)
    return out


def _comments(text: str) -> str:
    """Comment lines without their '#', indentation kept: commands in comments are written
    indented (`#   docker build ...`), prose is not."""
    return "\n".join(re.sub(r"^\s*#", "", ln) for ln in text.splitlines()
                     if ln.lstrip().startswith("#") and not ln.lstrip().startswith("#!"))


def _yaml_strings(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for v in node.values() for s in _yaml_strings(v)]
    if isinstance(node, list):
        out = [s for v in node for s in _yaml_strings(v)]
        if node and all(isinstance(v, str) for v in node):
            out.append(shlex.join(node))   # exec-form commands: ["ray", "start", ...]
        return out
    return []


def _code_blocks(markdown: str) -> str:
    return "\n".join(re.findall(r"^```[\w-]*\n(.*?)^```", markdown, re.S | re.M))


def _sources() -> list[tuple[str, str]]:
    """(where, shell text) for every place in docker/ that holds commands."""
    out = []
    for p in TEXT_FILES:
        rel = str(p.relative_to(ROOT))
        text = p.read_text()
        if p.suffix in (".yaml", ".yml"):
            out += [(rel, s) for d in _load(p) for s in _yaml_strings(d)]
            out += [(f"{rel} (comment)", c) for c in _command_lines(_comments(text), indent=2)]
        elif p.suffix == ".md":
            out += [(f"{rel} (code)", c) for c in _command_lines(_code_blocks(text))]
        elif p.name == "Dockerfile" or p.suffix == ".sbatch":
            code = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))
            out.append((rel, code))
            out += [(f"{rel} (comment)", c) for c in _command_lines(_comments(text), indent=2)]
    return out


def _all_invocations() -> list[tuple[str, str, list[str]]]:
    seen = {(where, prog, tuple(argv)): None for where, text in _sources()
            for prog, argv in _invocations(text)}
    return [(where, prog, list(argv)) for where, prog, argv in seen]


INVOCATIONS = _all_invocations()


def _placeholder(tok: str) -> bool:
    return "$" in tok or tok.startswith("<")


def _repo_path(path: str) -> Path:
    return ROOT / (path[len(APP) + 1:] if path.startswith(APP + "/") else path)


def _fill(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """Stand-ins for shell variables where argparse checks the value: the first choice of
    an option with choices, "1" for a number; string values stay as written."""
    actions = parser._option_string_actions

    def stand_in(option: str | None, value: str) -> str:
        act = actions.get(option) if option else None
        if not _placeholder(value) or act is None:
            return value
        if act.choices:
            return str(next(iter(act.choices)))
        return "1" if act.type in (int, float) else value

    out, prev = [], None
    for tok in argv:
        if tok.startswith("-") and "=" in tok:
            name, value = tok.split("=", 1)
            out.append(f"{name}={stand_in(name, value)}")
        else:
            out.append(stand_in(prev, tok))
        prev = tok
    return out


def _exact_options(parser: argparse.ArgumentParser, argv: list[str], where: str) -> None:
    """argparse accepts unique prefixes (--num-gpu for --num-gpus); the files must not rely
    on that. Stops at the module of a launcher (-m X): the rest is the module's."""
    for tok in argv:
        if tok == "--" or (tok in ("-m", "--module")
                           and parser.prog in ("torchrun", "accelerate launch")):
            return
        name = tok.split("=", 1)[0]
        if tok.startswith("--") and name not in parser._option_string_actions:
            pytest.fail(f"{where}: `{parser.prog}` has no option {name} (abbreviations of "
                        "options are not allowed here)")


def _parse(parser: argparse.ArgumentParser, argv: list[str], where: str):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return parser.parse_args(argv)
    except SystemExit as e:
        if e.code == 0:                    # --help
            return None
        pytest.fail(f"{where}: `{parser.prog} {shlex.join(argv)}` is refused by the real "
                    f"parser: {err.getvalue().strip().splitlines()[-1:]}")


def _subparser(parser: argparse.ArgumentParser, name: str, where: str):
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert name in sub.choices, (f"{where}: `{parser.prog} {name}`: no such subcommand "
                                 f"(there are {sorted(sub.choices)})")
    return sub.choices[name]


def _parse_command(parser: argparse.ArgumentParser, argv: list[str], where: str):
    """`prog SUBCOMMAND ...` through the real parser; None for a bare `prog --help`."""
    if argv[0].startswith("-"):
        _parse(parser, argv, where)
        return None
    sp = _subparser(parser, argv[0], where)
    _exact_options(sp, argv[1:], where)
    return _parse(parser, [argv[0]] + _fill(sp, argv[1:]), where)


def _check_pipeline(argv: list[str], where: str) -> None:
    from pipeline.cli import build_parser
    _parse_command(build_parser(), argv, where)


def _check_train(argv: list[str], where: str) -> None:
    from omegaconf import DictConfig, OmegaConf

    from train.cli import build_parser
    from train.config import TrainConfig, load_config
    ns = _parse_command(build_parser(), argv, where)
    if ns is None or argv[0] != "run":
        return
    config = None if _placeholder(ns.config) else _repo_path(ns.config)
    assert config is None or config.is_file(), f"{where}: {ns.config} is not in the repo"
    schema = OmegaConf.structured(TrainConfig)
    overrides = []
    for ov in ns.overrides:
        key, _, value = ov.partition("=")
        if _placeholder(key):
            continue                        # "$EXTRA": whatever the user adds
        parent_path, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(schema, parent_path) if parent_path else schema
        assert isinstance(parent, DictConfig) and leaf in parent.keys(), (
            f"{where}: train run override {key!r} is not a config key")
        if _placeholder(value):             # a stand-in of the key's type
            default = None if OmegaConf.is_missing(parent, leaf) else parent[leaf]
            value = "/placeholder" if default is None or isinstance(default, str) else default
        overrides.append(f"{key}={value}")
    load_config(config, overrides)          # types and ranges; required keys given


def _check_python_module(module: str, args: list[str], where: str) -> None:
    if module == "train.cli":
        _check_train(args, where)
    elif module == "pipeline.cli":
        _check_pipeline(args, where)
    else:
        assert importlib.util.find_spec(module) is not None, f"{where}: no module {module}"


def _check_accelerate(argv: list[str], where: str) -> None:
    assert argv[0] in ("launch", "config", "env", "test"), f"{where}: accelerate {argv[0]}?"
    if argv[0] != "launch":
        return
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser
    parser = launch_command_parser()
    parser.prog = "accelerate launch"
    _exact_options(parser, argv[1:], where)
    ns = _parse(parser, _fill(parser, argv[1:]), where)
    if ns.config_file:
        path = _repo_path(ns.config_file)
        assert path.is_file(), f"{where}: accelerate config {ns.config_file} not in the repo"
        load_config_from_file(str(path))
    assert ns.module, f"{where}: accelerate launch without -m (the project runs modules)"
    _check_python_module(ns.training_script, ns.training_script_args, where)


def _check_torchrun(argv: list[str], where: str) -> None:
    from torch.distributed.run import get_args_parser
    parser = get_args_parser()
    parser.prog = "torchrun"
    _exact_options(parser, argv, where)
    ns = _parse(parser, _fill(parser, argv), where)
    assert ns.module, f"{where}: torchrun without -m (the project runs modules)"
    _check_python_module(ns.training_script, ns.training_script_args, where)


def _check_click(cmd, name: str, argv: list[str], where: str) -> None:
    import click
    args = ["1" if _placeholder(a) else a for a in argv]
    try:
        cmd.make_context(name, args, resilient_parsing=False)
    except click.exceptions.Exit:
        pass
    except click.ClickException as e:
        pytest.fail(f"{where}: `{name} {shlex.join(argv)}` is refused by ray: {e}")


def _check_ray(argv: list[str], where: str) -> None:
    from ray.scripts.scripts import cli
    if argv[0].startswith("-"):             # ray --version
        _check_click(cli, "ray", argv, where)
        return
    cmd = cli.commands.get(argv[0])
    assert cmd is not None, f"{where}: `ray {argv[0]}`: no such command"
    rest = argv[1:]
    if argv[0] == "job":
        cmd = cmd.commands.get(rest[0]) if rest else None
        assert cmd is not None, f"{where}: `ray job {rest[:1]}`: no such command"
        rest = rest[1:]
    _check_click(cmd, f"ray {argv[0]}", rest, where)
    if "--" in rest:                       # ray job submit ... -- ENTRYPOINT
        entry = rest[rest.index("--") + 1:]
        _check_invocation(os.path.basename(entry[0]), entry[1:], f"{where} (entrypoint)")


def _check_invocation(prog: str, argv: list[str], where: str) -> None:
    if prog == "pipeline":
        _check_pipeline(argv, where)
    elif prog == "train":
        _check_train(argv, where)
    elif prog == "accelerate":
        _check_accelerate(argv, where)
    elif prog == "torchrun":
        _check_torchrun(argv, where)
    elif prog == "ray":
        _check_ray(argv, where)
    elif prog == "hf":
        assert argv[0] == "download", f"{where}: hf {argv[0]}?"
    elif prog.startswith("python"):
        if argv[0] == "-m":
            _check_python_module(argv[1], argv[2:], where)
    bindir = Path(sys.executable).parent
    if not prog.startswith("python"):
        assert shutil.which(prog, path=str(bindir)), (
            f"{where}: `{prog}` is not installed with the project")


def test_the_scan_finds_the_commands():
    """Guard for the scanner itself: the commands the other tests validate are seen."""
    seen = {(prog, argv[0]) for _, prog, argv in INVOCATIONS}
    for want in [("pipeline", "encode"), ("accelerate", "launch"), ("torchrun", "--nnodes"),
                 ("ray", "start"), ("ray", "job"), ("hf", "download"), ("train", "run")]:
        assert want in seen, f"no `{' '.join(want)}` found in docker/: {sorted(seen)}"
    where = {w.split(" ")[0] for w, _, _ in INVOCATIONS}
    for f in ("docker/kuberay/rayjob-encode.yaml", "docker/compose.yaml",
              "docker/slurm/train.sbatch", "docker/kubernetes/train-job.yaml",
              "docker/README.md", "docker/Dockerfile"):
        assert f in where, f"no command found in {f}"


@pytest.mark.parametrize("where,prog,argv", INVOCATIONS,
                         ids=[f"{w}:{p} {' '.join(a[:2])}" for w, p, a in INVOCATIONS])
def test_command_lines_parse_with_the_real_cli(where, prog, argv):
    _check_invocation(prog, argv, where)


# ---------------------------------------------------------------- paths

USER_CREATED = {"docker/.env", "docker/data"}   # compose's token file and data directory
PATH_RE = re.compile(r"(?<![\w/.:=-])(?:/app/)?((?:docker|configs|tests|pipeline|train|cache|"
                     r"benchmarks|docs)/[\w./-]*[\w])")


def test_repository_paths_exist():
    for p in TEXT_FILES:
        if p.name.endswith("ignore"):       # patterns, not references
            continue
        text = p.read_text()
        # relative paths and /app/... (the repository in the image); other absolute paths
        # (/cache/..., /data/...) are volumes
        for m in PATH_RE.finditer(text):
            path = m.group(1)
            if path in USER_CREATED:
                continue
            assert (ROOT / path).exists(), f"{p.relative_to(ROOT)}: {path} is not in the repo"
        for link in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" not in link:
                assert (p.parent / link).exists(), f"{p.relative_to(ROOT)}: dead link {link}"


def test_every_config_default_and_module_exists():
    text = "\n".join(p.read_text() for p in TEXT_FILES)
    for cfg in set(re.findall(r"configs/[\w.-]+\.ya?ml", text)):
        assert (ROOT / cfg).is_file(), cfg
    for module in set(re.findall(r"-m\s+([a-z_]+(?:\.[a-z_]+)+)", text)):
        assert importlib.util.find_spec(module) is not None, module


# ---------------------------------------------------------------- YAML structure

@pytest.mark.parametrize("path", YAML_FILES, ids=[p.name for p in YAML_FILES])
def test_yaml_parses(path):
    docs = _load(path)
    assert docs and all(isinstance(d, dict) for d in docs)


def _pod_templates():
    """(where, pod spec) of every pod the Kubernetes manifests create."""
    out = []
    for p in YAML_FILES:
        for d in _load(p):
            kind, spec = d.get("kind"), d.get("spec", {})
            cluster = spec.get("rayClusterSpec") if kind == "RayJob" else spec
            if kind in ("RayCluster", "RayJob"):
                out.append((f"{p.name} head", cluster["headGroupSpec"]["template"]["spec"]))
                out += [(f"{p.name} {g['groupName']}", g["template"]["spec"])
                        for g in cluster.get("workerGroupSpecs", [])]
            elif kind == "Job":
                out.append((p.name, spec["template"]["spec"]))
    return out


def _gpus(pod: dict) -> int:
    return sum(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
               for c in pod["containers"])


def _ray_cluster_specs():
    return ([("RayCluster", d["spec"]) for _, d in _docs("RayCluster")]
            + [("RayJob", d["spec"]["rayClusterSpec"]) for _, d in _docs("RayJob")])


RAY_CLUSTER_KEYS = {"headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling",
                    "authOptions", "networkPolicy", "tlsOptions", "historyServerOptions",
                    "autoscalerOptions", "headServiceAnnotations", "suspend",
                    "gcsFaultToleranceOptions", "managedBy", "upgradeStrategy"}
RAY_JOB_KEYS = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate",
                "metadata", "clusterSelector", "submitterConfig", "managedBy",
                "deletionStrategy", "entrypoint", "runtimeEnvYAML", "jobId", "submissionMode",
                "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
                "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend", "schedule"}


def test_ray_clusters_have_a_head_and_gpu_workers():
    specs = _ray_cluster_specs()
    assert {k for k, _ in specs} == {"RayCluster", "RayJob"}
    ray_version = _dockerfile_arg("RAY_VERSION")
    for kind, spec in specs:
        assert set(spec) <= RAY_CLUSTER_KEYS, f"{kind}: unknown keys {set(spec) - RAY_CLUSTER_KEYS}"
        assert spec["rayVersion"] == ray_version, f"{kind}: rayVersion != the image's Ray"
        head = spec["headGroupSpec"]
        workers = spec["workerGroupSpecs"]
        assert workers and all(_gpus(g["template"]["spec"]) > 0 for g in workers), kind
        for group in [head, *workers]:
            params = group["rayStartParams"]
            assert all(isinstance(v, str) for v in params.values()), (
                f"{kind}: rayStartParams must be strings (KubeRay's map[string]string)")
            assert "block" not in params   # KubeRay adds --block itself
        for g in workers:
            assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], kind
        # Ray >= 2.52: a token shared by every node (KubeRay generates and injects it)
        assert spec.get("authOptions", {}).get("mode") == "token", kind
        # the driver (head) and the workers see the data, the cache and HF_HOME alike
        mounts = [{m["mountPath"] for c in grp["template"]["spec"]["containers"]
                   for m in c.get("volumeMounts", [])} for grp in [head, *workers]]
        for m in mounts:
            assert {"/data", "/cache", _dockerfile_env("HF_HOME"), "/dev/shm"} <= m, kind


def test_rayjob_shuts_down_and_resumes_from_the_cache():
    job = _one("RayJob")["spec"]
    assert set(job) <= RAY_JOB_KEYS, f"unknown RayJob keys {set(job) - RAY_JOB_KEYS}"
    assert job["shutdownAfterJobFinishes"] is True
    assert isinstance(job["ttlSecondsAfterFinished"], int) and job["ttlSecondsAfterFinished"] >= 0
    [(prog, argv)] = _invocations(job["entrypoint"])
    assert (prog, argv[0]) == ("pipeline", "encode")
    from pipeline.cli import build_parser
    ns = _parse(build_parser(), argv, "RayJob entrypoint")
    assert ns.address == "auto"
    total = sum(g["replicas"] * _gpus(g["template"]["spec"])
                for g in job["rayClusterSpec"]["workerGroupSpecs"])
    assert ns.num_gpus == total, f"--num-gpus {ns.num_gpus} but the workers have {total} GPUs"
    text = (DOCKER / "kuberay" / "rayjob-encode.yaml").read_text().lower()
    assert "from scratch" in text or "from the start" in text
    assert "done marker" in text


def test_pods_are_consistent():
    claims = {d["metadata"]["name"] for _, d in _docs("PersistentVolumeClaim")}
    images = set()
    for where, pod in _pod_templates():
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        sc = pod.get("securityContext", {})
        assert sc.get("runAsNonRoot") is True and sc.get("runAsUser", 0) != 0, where
        for c in pod["containers"]:
            images.add(c["image"])
            assert c.get("imagePullPolicy") in (None, "Always", "IfNotPresent", "Never")
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes, f"{where}: mount of undefined volume {m['name']}"
            for e in c.get("env", []):
                assert isinstance(e.get("value", ""), str), f"{where}: env {e['name']} not a string"
                if e["name"] == "HF_HOME":
                    assert e["value"] == _dockerfile_env("HF_HOME")
            res = c.get("resources", {})
            if "nvidia.com/gpu" in res.get("requests", {}):
                assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"]
        for v in volumes.values():
            if "persistentVolumeClaim" in v:
                claim = v["persistentVolumeClaim"]["claimName"]
                assert claim in claims, f"{where}: PVC {claim} is not in storage.yaml"
    assert len(images) == 1, f"the manifests name different images: {images}"


def test_training_job_rendezvous():
    [(_, svc)] = [(p, d) for p, d in _docs("Service") if d["metadata"]["name"] == "urepa-train"]
    [job] = [d for _, d in _docs("Job") if d["metadata"]["name"] == "urepa-train"]
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["completionMode"] == "Indexed"
    assert svc["spec"]["clusterIP"] == "None"
    assert pod["subdomain"] == svc["metadata"]["name"]
    assert svc["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
    [(prog, argv)] = [i for s in _yaml_strings(pod["containers"]) for i in _invocations(s)
                      if i[0] == "torchrun"][:1]
    from torch.distributed.run import get_args_parser
    ns = get_args_parser().parse_args(_fill(get_args_parser(), argv))
    assert int(ns.nnodes) == spec["completions"] == spec["parallelism"]
    assert int(ns.nproc_per_node) == _gpus(pod)
    assert ns.master_addr == f"{job['metadata']['name']}-0.{pod['subdomain']}"
    assert "JOB_COMPLETION_INDEX" in " ".join(argv)
    assert any(m["mountPath"] == "/dev/shm" for c in pod["containers"]
               for m in c["volumeMounts"])


def test_compose_has_a_head_and_a_worker():
    [(path, compose)] = [(p, d) for p in YAML_FILES if p.name == "compose.yaml"
                         for d in _load(p)]
    services = compose["services"]
    heads = {n: s for n, s in services.items() if "--head" in str(s.get("command"))}
    assert len(heads) == 1, "one service runs `ray start --head`"
    [(head_name, head)] = heads.items()
    head_argv = _words(head["command"])
    assert head_argv[:2] == ["ray", "start"] and "--block" in head_argv
    port = next(a.split("=")[1] for a in head_argv if a.startswith("--port="))
    workers = {n: s for n, s in services.items() if n != head_name}
    assert workers
    for name, w in workers.items():
        argv = _words(w["command"])
        assert argv[:2] == ["ray", "start"] and "--block" in argv
        assert f"--address={head_name}:{port}" in argv, name
        assert w["image"] == head["image"], "head and workers run the same image"
        assert w["volumes"] == head["volumes"], "the same data and cache in every container"
        assert w["depends_on"][head_name]
    assert any("gpu" in str(w.get("deploy")) for w in workers.values())
    dockerfile = (path.parent / head["build"]["context"] / head["build"]["dockerfile"])
    assert dockerfile.resolve() == DOCKERFILE
    named = {v.split(":")[0] for v in head["volumes"] if not v.startswith(("$", ".", "/"))}
    assert named <= set(compose.get("volumes", {}))
    assert any(v.split(":")[1] == "/cache" for v in head["volumes"])
    assert head["environment"]["HF_HOME"] == _dockerfile_env("HF_HOME")
    for s in services.values():   # one Ray token for every container
        assert s["environment"]["RAY_AUTH_MODE"] == "token"
        assert s["environment"]["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN")
    assert ".env" in (DOCKER / ".gitignore").read_text().split()
    # the documented way to run encode against it
    assert any(w.endswith("(comment)") and p == "pipeline" and "auto" in a
               for w, p, a in INVOCATIONS if w.startswith("docker/compose.yaml"))


# ---------------------------------------------------------------- multi-node training

def test_accelerate_config_is_accepted_by_accelerate():
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.utils import DistributedType

    from train.config import TrainConfig, load_config
    path = DOCKER / "accelerate" / "multi_node.yaml"
    cfg = load_config_from_file(str(path))      # raises on keys accelerate does not know
    assert isinstance(cfg, ClusterConfig)
    assert cfg.distributed_type == DistributedType.MULTI_GPU
    assert cfg.num_machines > 1 and cfg.num_processes % cfg.num_machines == 0
    assert cfg.main_process_port
    preset = load_config(ROOT / "configs" / "urepa.yaml", ["data.cache=/c", "run_dir=/r"])
    assert cfg.mixed_precision == TrainConfig().mixed_precision == preset.mixed_precision
    # what differs per node comes from the launch line, not the file
    launches = [a for _, p, a in INVOCATIONS if p == "accelerate" and "multi_node.yaml" in str(a)]
    assert launches
    for argv in launches:
        assert "--machine_rank" in argv and "--main_process_ip" in argv, argv


def test_sbatch_script():
    path = DOCKER / "slurm" / "train.sbatch"
    text = path.read_text()
    subprocess.run(["bash", "-n", str(path)], check=True)
    sbatch = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, re.M))
    assert sbatch["ntasks-per-node"] == "1", "one launcher per node"
    assert sbatch["gpus-per-node"] == re.search(r"GPUS_PER_NODE=\$\{GPUS_PER_NODE:-(\d+)", text)[1]
    assert "srun" in text and "SLURM_NODEID" in text and "SLURM_JOB_NODELIST" in text
    assert os.access(path, os.X_OK)


# ---------------------------------------------------------------- the image

def _dockerignore_patterns() -> list[str]:
    lines = (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def _ignored(rel: str, patterns: list[str]) -> bool:
    """Docker's rule for the simple patterns used here (no ! exceptions): a path is out
    when it or one of its parent directories matches a pattern."""
    assert not any(p.startswith("!") for p in patterns)
    parts = rel.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pat in patterns:
        pat = pat.strip("/")
        for pre in prefixes:
            if fnmatch.fnmatchcase(pre, pat):
                return True
            if pat.startswith("**/") and fnmatch.fnmatchcase(pre.split("/")[-1], pat[3:]):
                return True
    return False


def test_build_context_keeps_the_project_and_drops_local_state():
    patterns = _dockerignore_patterns()
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"]["find"]["include"]
    needed = ["pyproject.toml", "README.md", "Makefile"]
    for top in [p.rstrip("*") for p in packages] + ["configs", "tests"]:
        needed += [str(f.relative_to(ROOT)) for f in (ROOT / top).rglob("*")
                   if f.is_file() and "__pycache__" not in f.parts]
    kept_out = [f for f in needed if _ignored(f, patterns)]
    assert not kept_out, f"the image would miss {kept_out[:5]}"
    for local in (".venv/bin/python", "demo_out/cache/manifest.json", ".git/HEAD", "docker/.env",
                  "train/__pycache__/cli.cpython-312.pyc", "runs/x/config.yaml"):
        assert _ignored(local, patterns), local


def _makefile_install() -> list[str]:
    m = re.search(r"^\t\$\(BIN\)/python -m pip install (.*(?:\.\[|'\.).*)$",
                  (ROOT / "Makefile").read_text(), re.M)
    assert m, "the Makefile's project install line moved: update this test"
    return [a for a in shlex.split(m.group(1)) if a != "--quiet"]


def test_dockerfile_installs_the_project_like_the_makefile():
    text = DOCKERFILE.read_text()
    code = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))
    installs = [a[3:] for p, a in _invocations(code)
                if p.startswith("python") and a[:3] == ["-m", "pip", "install"]]
    want = _makefile_install()                       # e.g. ['-e', '.[test]']
    assert any(a[i:i + len(want)] == want for a in installs for i in range(len(a))), (
        f"the Dockerfile does not run `python -m pip install {shlex.join(want)}`: {installs}")
    assert ["--upgrade", "pip"] in installs
    # the whole context is copied before that install, the venv is first in PATH
    copy_all = re.search(r"^COPY (?:--chown=\S+ )?\. ", code, re.M)
    assert copy_all and copy_all.start() < code.index(f"pip install {want[0]}")
    assert re.search(r"^ENV .*PATH=/opt/venv/bin:\$PATH", code, re.M | re.S)
    # the dependencies come from pyproject.toml, torch from the package index
    assert "pyproject.toml" in code and "tomllib" in code
    assert "download.pytorch.org" not in code and "--index-url" not in code


def test_dockerfile_python_base_user_and_entrypoint():
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    text = DOCKERFILE.read_text()
    code = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    versions = set(re.findall(r"python(3\.\d+)", code))
    assert len(versions) == 1, f"one Python in the image, found {versions}"
    [version] = versions
    assert version in SpecifierSet(pyproject["requires-python"])
    makefile_first = re.search(r"for p in (python3\.\d+)", (ROOT / "Makefile").read_text())[1]
    assert makefile_first == f"python{version}", "the Makefile's first choice of Python"
    base = _dockerfile_arg("BASE_IMAGE")
    assert base.startswith("nvidia/cuda:") and "runtime" in base and "ubuntu" in base
    assert re.search(r"^FROM \$\{BASE_IMAGE\}", code, re.M)
    # KubeRay and compose choose the command (ray start ...): no ENTRYPOINT
    assert not re.search(r"^ENTRYPOINT", code, re.M)
    users = re.findall(r"^USER (\S+)", code, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert _dockerfile_env("HF_HOME") == "/cache/hf"
    ray = _dockerfile_arg("RAY_VERSION")
    [req] = [Requirement(d) for d in pyproject["dependencies"] if d.startswith("ray")]
    assert req.specifier.contains(ray), f"RAY_VERSION {ray} vs the project's {req}"
    assert re.search(r'ray\[default[\w,]*\]==\$\{RAY_VERSION\}', code)
    assert "EXTRA_PIP_PACKAGES" in code
    assert "s3fs gcsfs" in text and "s3fs gcsfs" in (DOCKER / "README.md").read_text()
    assert "wget" in code          # KubeRay's default probes run it


def test_readme_says_what_was_not_exercised():
    text = (DOCKER / "README.md").read_text()
    assert re.search(r"^#+ What was not exercised", text, re.M)
    assert "docker build -f docker/Dockerfile" in text


def test_training_pods_accept_connections_only_from_their_own_job():
    """The rendezvous store and NCCL have no authentication (docs/trust.md): the train
    Job's NetworkPolicy admits only the Job's own pods, and selects exactly those pods."""
    docs = _load(DOCKER / "kubernetes" / "train-job.yaml")
    [job] = [d for d in docs if d["kind"] == "Job"]
    [policy] = [d for d in docs if d["kind"] == "NetworkPolicy"]
    own = {"job-name": job["metadata"]["name"]}
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"] == own and spec["policyTypes"] == ["Ingress"]
    assert spec["ingress"] == [{"from": [{"podSelector": {"matchLabels": own}}]}]
