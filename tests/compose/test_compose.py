"""compose/ checked against the code, since no Docker engine runs here: every environment name is a setting, every
command parses with the `llmcf` parser, ports agree with the settings and the commands' metrics ports, Prometheus scrapes
exactly the processes' metrics endpoints, every metric in the alert rules and the dashboard is one the code exports,
every alert links to a docs/runbook.md section, topic names come from llmcf/topics.py, and no secret is written down.
When promtool is installed (Debian: `apt-get install prometheus`), the Prometheus configuration is validated and the
alert rules' unit tests (compose/prometheus/alerts.test.yml) are run.
"""

from __future__ import annotations

import functools
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from sqlalchemy.engine import make_url

from llmcf.settings import SETTINGS, Settings
from llmcf.topics import Topics
from testkit.docs import heading_anchors

ROOT = Path(__file__).parents[2]
COMPOSE = ROOT / "compose"
APP_DOCKERFILE = "compose/Dockerfile"
SETTING_NAMES = {s.env for s in SETTINGS}
# Names the settings catalogue owns; other variables (POSTGRES_*, GF_*, the broker's KAFKA_NODE_ID...) belong to
# third-party images and are only checked for secrets.
OURS = re.compile(r"^(LLMCF_\w+|KAFKA_\w+|QDRANT_\w+|DATABASE_URL)$")
SECRET_NAME = re.compile(r"PASSWORD|TOKEN|SECRET|API_KEY")
INTERPOLATION = re.compile(r"\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")
PROCESS_COMMANDS = {"worker", "generate", "update", "serve"}
SCRAPE_LABELS = {"instance", "job", "service"}


def _compose() -> dict:
    return yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())


def _services() -> dict[str, dict]:
    return _compose()["services"]


def _app_services() -> dict[str, dict]:
    """The services that run the llmcf image (built from compose/Dockerfile)."""
    return {name: s for name, s in _services().items() if (s.get("build") or {}).get("dockerfile") == APP_DOCKERFILE}


def _interpolate(text: str, variables: dict[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}`, `${VAR:?error}` substitution (and `$$` for a literal `$`)."""

    def substitute(match: re.Match) -> str:
        name, op, arg = match["name"], match["op"], match["arg"]
        value = variables.get(name)
        if op in (":-", ":?") and not value or op in ("-", "?") and value is None:
            if op.endswith("?"):
                raise KeyError(f"{name} is required: {arg}")
            return arg
        return value or ""

    return INTERPOLATION.sub(substitute, text).replace("$$", "$")


def _env_example() -> dict[str, str]:
    pairs = {}
    for line in (COMPOSE / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            pairs[name.strip()] = value.strip()
    return pairs


def _filled_env_file() -> dict[str, str]:
    """compose/.env as an operator fills it in: .env.example with every empty secret given a value."""
    return {name: value or f"filled-{name.lower()}" for name, value in _env_example().items()}


def _environment(service: dict) -> dict[str, str]:
    """The service's environment after substitution from the filled-in .env."""
    variables = _filled_env_file()
    return {name: _interpolate(str(value), variables) for name, value in (service.get("environment") or {}).items()}


def _llmcf_invocations(service: dict) -> list[list[str]]:
    """Each `llmcf ...` command line the service runs (`sh -c "a && b"` gives two)."""
    command = service.get("command") or []
    lines = [shlex.split(part) for part in command[2].split("&&")] if command[:2] == ["sh", "-c"] else [command]
    for argv in lines:
        assert argv and argv[0] == "llmcf", f"{argv} does not run llmcf"
    return lines


def _parse(argv: list[str]):
    from llmcf.cli import build_parser

    try:
        return build_parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"`{shlex.join(argv)}` is not a valid llmcf command line (see the argparse error above)")


def _process_port(argv: list[str], settings: Settings) -> int | None:
    """Where the process started by `argv` serves /metrics: its flag, else LLMCF_METRICS_PORT, else the command's
    default; the ranker serves it on its API port."""
    args = _parse(argv)
    if args.command == "serve":
        return args.port or settings.ranker_port
    if args.command not in _code()["metrics_ports"]:
        return None
    if args.metrics_port is not None:
        return args.metrics_port
    return settings.metrics_port if settings.metrics_port is not None else _code()["metrics_ports"][args.command]


def _processes() -> dict[str, tuple[int, Settings]]:
    """Compose service -> (port of its /metrics, its settings), for every service that runs a long-lived process."""
    found = {}
    for name, service in _app_services().items():
        settings = Settings.from_env(_environment(service))
        ports = {_process_port(argv, settings) for argv in _llmcf_invocations(service)} - {None}
        assert len(ports) <= 1, f"{name} runs several processes: {ports}"
        if ports:
            found[name] = (ports.pop(), settings)
    return found


# --- the compose file against the settings and the CLI ---------------------------------------------------------------


def test_the_app_services_run_every_process_from_one_image():
    app = _app_services()
    commands = {_parse(argv).command for service in app.values() for argv in _llmcf_invocations(service)}
    assert PROCESS_COMMANDS | {"db", "infra"} <= commands
    assert len({service["image"] for service in app.values()}) == 1


@pytest.mark.parametrize("name", sorted(_app_services()))
def test_environment_names_are_catalogued_settings(name):
    service = _app_services()[name]
    unknown = sorted(key for key in service.get("environment") or {} if OURS.match(key) and key not in SETTING_NAMES)
    assert not unknown, f"{name} sets {unknown}, which llmcf.settings.SETTINGS does not declare"


@pytest.mark.parametrize("name", sorted(_app_services()))
def test_environment_values_are_valid_settings(name):
    settings = Settings.from_env(_environment(_app_services()[name]))
    assert settings.kafka_bootstrap_servers and settings.qdrant_url and settings.database_url.startswith("postgresql")


@pytest.mark.parametrize("name", sorted(_app_services()))
def test_commands_are_llmcf_sub_commands(name):
    for argv in _llmcf_invocations(_app_services()[name]):
        _parse(argv)


def test_every_process_points_at_the_infrastructure_services():
    services = _services()
    brokers = _kafka_brokers()
    for name, service in _app_services().items():
        env = _environment(service)
        host, _, port = env["KAFKA_BOOTSTRAP_SERVERS"].partition(":")
        assert host in brokers and f"//{host}:{port}" in services[host]["environment"]["KAFKA_ADVERTISED_LISTENERS"], name
        url = make_url(env["DATABASE_URL"])
        postgres = services[url.host]["environment"]
        assert (url.port, url.username, url.database) == (5432, postgres["POSTGRES_USER"], postgres["POSTGRES_DB"]), name
        assert url.password == _filled_env_file()["POSTGRES_PASSWORD"], name
        assert env["QDRANT_URL"].split("//")[1].split(":")[0] in services, name
        assert env["QDRANT_API_KEY"] == _environment(services["qdrant"])["QDRANT__SERVICE__API_KEY"], name


def test_every_process_waits_for_init_and_healthy_dependencies():
    services = _services()
    for name, service in _app_services().items():
        depends = service.get("depends_on") or {}
        if name != "init":
            assert depends.get("init") == {"condition": "service_completed_successfully"}, name
        for dependency, rule in depends.items():
            if dependency != "init":
                assert "healthcheck" in services[dependency], f"{name} waits for {dependency}, which has no healthcheck"
                assert rule == {"condition": "service_healthy"}, f"{name} -> {dependency}"
        assert service.get("restart") == ("no" if name == "init" else "unless-stopped"), name


def test_ports_agree_with_the_settings_and_metrics_ports():
    for name, (port, _) in _processes().items():
        service = _app_services()[name]
        health = " ".join(service["healthcheck"]["test"])
        assert f"127.0.0.1:{port}/" in health, f"{name}'s healthcheck does not probe its port {port}"
        for mapping in service.get("ports") or []:
            host_port, _, container_port = str(mapping).rpartition(":")
            assert int(container_port) == port == int(host_port), f"{name} publishes {mapping}, serves on {port}"
    ranker_port, ranker = _processes()["ranker"]
    default_port = next(s.default for s in SETTINGS if s.env == "LLMCF_RANKER_PORT")
    assert ranker_port == int(default_port)
    # Inside a container the API must listen on every interface, or the published port reaches nothing.
    assert (_parse(_llmcf_invocations(_app_services()["ranker"])[0]).host or ranker.ranker_host) == "0.0.0.0"


def test_generators_reserve_a_gpu_and_the_vllm_variant_uses_its_server():
    services = _services()
    for name in ("generator", "generator-vllm"):
        service = services[name]
        args = _parse(_llmcf_invocations(service)[0])
        assert args.command == "generate" and args.device == "cuda:0", name
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices), name
    vllm_generator = services["generator-vllm"]
    settings = Settings.from_env(_environment(vllm_generator))
    assert _parse(_llmcf_invocations(vllm_generator)[0]).backend == "openai"
    server, port = settings.openai_base_url.split("//")[1].split("/")[0].split(":")
    assert services[server]["profiles"] == vllm_generator["profiles"] == ["vllm"]
    command = services[server]["command"]
    assert command[command.index("--port") + 1] == port
    assert f"127.0.0.1:{port}/" in " ".join(services[server]["healthcheck"]["test"])
    assert "generator" not in services["generator"].get("profiles", [])


# --- topics ----------------------------------------------------------------------------------------------------------


def _kafka_brokers() -> set[str]:
    return {name for name, s in _services().items() if s["image"].startswith("apache/kafka")}


def test_init_migrates_and_creates_the_topics_the_processes_use():
    init = _app_services()["init"]
    commands = [(args.command, getattr(args, "action", None)) for args in map(_parse, _llmcf_invocations(init))]
    assert commands == [("db", "upgrade"), ("infra", "up")]
    topic_settings = {}
    for name, service in _app_services().items():
        settings = Settings.from_env(_environment(service))
        topic_settings[name] = (settings.topic_prefix, settings.topic_partitions, settings.topic_replication)
    assert len(set(topic_settings.values())) == 1, f"processes disagree on the topics: {topic_settings}"
    replication = Settings.from_env(_environment(init)).topic_replication
    assert replication <= len(_kafka_brokers()), "LLMCF_TOPIC_REPLICATION exceeds the brokers in the compose file"
    assert _services()["kafka"]["environment"]["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"


def test_topic_matchers_in_rules_and_dashboard_name_real_topics():
    names = set(Topics.from_settings(Settings.from_env({})).__dict__.values())
    for expr in _alert_expressions() + _dashboard_expressions():
        for op, value in re.findall(r'\btopic\s*(=~|=)\s*"([^"]*)"', expr):
            topic = value.removeprefix(".*") if op == "=~" else value
            assert topic in names and (op == "=" or value.startswith(".*")), f"{value!r} in {expr}"


# --- Prometheus --------------------------------------------------------------------------------------------------------


def _prometheus() -> dict:
    return yaml.safe_load((COMPOSE / "prometheus" / "prometheus.yml").read_text())


def _mounts(service: str) -> dict[str, str]:
    """Container path -> host path (relative to compose/) of the service's bind mounts."""
    mounts = {}
    for volume in _services()[service].get("volumes") or []:
        source, target = volume.split(":")[:2]
        if source.startswith("./"):
            mounts[target] = source
    return mounts


def test_prometheus_scrapes_exactly_the_processes_metrics_endpoints():
    targets = set()
    for job in _prometheus()["scrape_configs"]:
        for static in job.get("static_configs", []):
            targets |= set(static["targets"])
        for dns in job.get("dns_sd_configs", []):
            assert dns["type"] == "A"
            targets |= {f"{name}:{dns['port']}" for name in dns["names"]}
    assert targets == {f"{name}:{port}" for name, (port, _) in _processes().items()}


def test_prometheus_loads_the_mounted_config_and_rules():
    mounts = _mounts("prometheus")
    assert mounts["/etc/prometheus/prometheus.yml"] == "./prometheus/prometheus.yml"
    for rule_file in _prometheus()["rule_files"]:
        assert (COMPOSE / mounts[rule_file]).is_file(), rule_file


def _rules() -> list[dict]:
    groups = yaml.safe_load((COMPOSE / "prometheus" / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _alert_expressions() -> list[str]:
    return [rule["expr"] for rule in _rules()]


def test_every_alert_has_a_summary_a_description_and_a_runbook_section():
    anchors = heading_anchors(ROOT / "docs" / "runbook.md")
    for rule in _rules():
        annotations = rule["annotations"]
        assert annotations.get("summary") and annotations.get("description"), rule["alert"]
        document, _, anchor = annotations["runbook"].partition("#")
        assert document == "docs/runbook.md" and anchor in anchors, f"{rule['alert']}: no docs/runbook.md section #{anchor}"


def test_the_alerts_cover_the_failure_modes():
    used = {name for expr in _alert_expressions() for name in re.findall(r"\bllmcf_\w+", expr)}
    assert {
        "llmcf_freshness_seconds_bucket", "llmcf_consumer_committed_offset", "llmcf_partition_end_offset",
        "llmcf_generator_cots_total", "llmcf_dead_letters_total", "llmcf_ranker_requests_total", "llmcf_ranker_shed_total",
        "llmcf_ranker_request_seconds_bucket", "llmcf_ranker_model_age_seconds", "llmcf_updater_runs_total",
    } <= used
    assert len({rule["alert"] for rule in _rules()}) == len(_rules()), "two rules share an alert name"


# --- metric names --------------------------------------------------------------------------------------------------------


# Run in a child process: importing the metric modules here would register them in this test session's registry,
# which other tests compare with the README's catalogue.
_CODE_SCRIPT = """
import json
import generators.metrics, llmcf.metrics, ranker.serving.metrics, ranker.updates.metrics, streams.metrics
from prometheus_client import REGISTRY
from llmcf.ports import GENERATOR_METRICS_PORT, UPDATER_METRICS_PORT, WORKER_METRICS_PORT
# prometheus_client has no public way to list a metric's type and label names: they live on the metric object.
metrics = {m for m in REGISTRY._names_to_collectors.values() if getattr(m, "_name", "").startswith("llmcf_")}
print(json.dumps({
    "metrics": {m._name: [m._type, list(m._labelnames)] for m in metrics},
    "metrics_ports": {"worker": WORKER_METRICS_PORT, "generate": GENERATOR_METRICS_PORT, "update": UPDATER_METRICS_PORT},
}))
"""
_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count"), "info": ("_info",)}


@functools.cache
def _code() -> dict:
    """What the code exports (metric families: type and label names) and each command's default metrics port."""
    result = subprocess.run([sys.executable, "-c", _CODE_SCRIPT], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _exported() -> dict[str, frozenset[str]]:
    """Every series name the code exports -> the label names it may carry (scrape labels included)."""
    series = {}
    for name, (kind, labels) in _code()["metrics"].items():
        for suffix in _SUFFIXES[kind]:
            series[name + suffix] = frozenset(labels) | SCRAPE_LABELS | ({"le"} if suffix == "_bucket" else set())
    return series


def _dashboard() -> dict:
    return json.loads((COMPOSE / "grafana" / "dashboards" / "llmcf-freshness.json").read_text())


def _dashboard_panels() -> list[dict]:
    panels = []
    for panel in _dashboard()["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def _dashboard_expressions() -> list[str]:
    return [target["expr"] for panel in _dashboard_panels() for target in panel.get("targets", [])]


@pytest.mark.parametrize("source", ["alerts", "dashboard"])
def test_every_metric_and_label_in_promql_is_exported_by_the_code(source):
    exported = _exported()
    expressions = _alert_expressions() if source == "alerts" else _dashboard_expressions()
    assert expressions
    for expr in expressions:
        for name in re.findall(r"\bllmcf_\w+", expr):
            assert name in exported, f"{name} (in {source}: {expr.strip()}) is not exported by the code"
        for name, matchers in re.findall(r"\b(llmcf_\w+)\s*\{([^}]*)\}", expr):
            labels = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))
            assert labels <= exported[name], f"{name} has no label {labels - exported[name]} ({source}: {expr.strip()})"


def test_the_dashboard_shows_every_exported_metric():
    used = {name for expr in _dashboard_expressions() for name in re.findall(r"\bllmcf_\w+", expr)}
    families = {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in used}
    missing = {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in _exported()} - families
    assert not missing, f"no dashboard panel shows {sorted(missing)}"


# --- Grafana -----------------------------------------------------------------------------------------------------------


def test_the_dashboard_is_valid_grafana_json_on_a_provisioned_datasource():
    dashboard = _dashboard()
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["uid"] and dashboard["title"]
    panels = _dashboard_panels()
    assert len({panel["id"] for panel in panels}) == len(panels), "panel ids repeat"
    datasources = {
        ds["uid"]
        for path in (COMPOSE / "grafana" / "provisioning" / "datasources").glob("*.yml")
        for ds in yaml.safe_load(path.read_text())["datasources"]
    }
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["title"] and panel["gridPos"]["w"] <= 24 and panel["targets"], panel["title"]
        for item in (panel, *panel["targets"]):
            assert item["datasource"]["uid"] in datasources, panel["title"]


def test_grafana_provisions_the_dashboards_directory_it_mounts():
    mounts = _mounts("grafana")
    providers = [
        provider
        for path in (COMPOSE / "grafana" / "provisioning" / "dashboards").glob("*.yml")
        for provider in yaml.safe_load(path.read_text())["providers"]
    ]
    assert mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"
    for provider in providers:
        assert mounts[provider["options"]["path"]] == "./grafana/dashboards"
    home = _services()["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    directory, _, file = home.rpartition("/")
    assert (COMPOSE / mounts[directory] / file).is_file()


# --- secrets -----------------------------------------------------------------------------------------------------------


def _is_secret(name: str) -> bool:
    return name in {s.env for s in SETTINGS if s.secret} or bool(SECRET_NAME.search(name))


def test_no_secret_is_written_in_the_compose_file():
    example = _env_example()
    for service_name, service in _services().items():
        for name, raw in (service.get("environment") or {}).items():
            if not _is_secret(name):
                continue
            raw = str(raw)
            interpolations = list(INTERPOLATION.finditer(raw))
            assert interpolations, f"{service_name}: {name} is written in the compose file, not taken from .env"
            for match in interpolations:
                assert match["name"] in example, f"{service_name}: {name} uses {match['name']}, absent from .env.example"
                assert match["op"] in (":?", ":-") and (match["op"] == ":?" or match["arg"] == ""), (
                    f"{service_name}: {name} has a default value in the compose file"
                )
            if name == "DATABASE_URL":
                assert INTERPOLATION.fullmatch(make_url(raw).password), f"{service_name}: the database password is written"
            else:
                assert INTERPOLATION.fullmatch(raw), f"{service_name}: {name} mixes a literal into the secret"


def test_env_example_holds_placeholders_only_and_every_variable_compose_needs():
    assert ".env" in (COMPOSE / ".gitignore").read_text().splitlines(), "compose/.env (the real secrets) is not git-ignored"
    example = _env_example()
    for name, value in example.items():
        if _is_secret(name):
            assert value == "", f".env.example gives {name} a value: leave secrets empty"
    values = list(_strings(_compose()))
    used = {m["name"]: m["op"] for value in values for m in INTERPOLATION.finditer(value)}
    required = {name for name, op in used.items() if op in (None, ":?", "?")}
    assert required <= set(example), f"compose needs {sorted(required - set(example))}, absent from .env.example"
    assert set(example) <= set(used), f".env.example lists {sorted(set(example) - set(used))}, which compose never uses"
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD"):
        for value in values:  # the example as it is, secrets empty, must not start anything
            _interpolate(value, example)


def _strings(node) -> list[str]:
    """Every string in a parsed YAML document, keys included (compose substitutes ${...} in both)."""
    if isinstance(node, dict):
        return [text for key, value in node.items() for text in (*_strings(key), *_strings(value))]
    if isinstance(node, list):
        return [text for item in node for text in _strings(item)]
    return [node] if isinstance(node, str) else []


# --- the image ---------------------------------------------------------------------------------------------------------


def test_the_image_is_python_311_slim_installs_the_project_and_runs_as_a_user():
    dockerfile = (COMPOSE / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+)", dockerfile, flags=re.M)
    assert stages and all(image.startswith("python:3.11-slim") for image in stages)
    assert re.search(r"pip install \.(\s|$)", dockerfile)
    users = re.findall(r"^USER (\S+)", dockerfile, flags=re.M)
    assert users and users[-1] not in {"root", "0"}
    packages = re.findall(r'include = \[([^\]]*)\]', (ROOT / "pyproject.toml").read_text())[0]
    for package in re.findall(r'"(\w+)\*"', packages):
        assert re.search(rf"^COPY {package} {package}$", dockerfile, flags=re.M), f"the image lacks {package}/"
    makefile_packages = re.search(r"^DATA_PACKAGES := (.+)$", (ROOT / "Makefile").read_text(), flags=re.M)[1].split()
    image_packages = re.search(r'^ARG DATA_PACKAGES="([^"]+)"', dockerfile, flags=re.M)[1].split()
    assert image_packages == makefile_packages


# --- promtool --------------------------------------------------------------------------------------------------------------


@pytest.fixture
def promtool():
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    return path


def test_promtool_accepts_the_configuration(promtool, tmp_path):
    config = _prometheus()
    mounts = _mounts("prometheus")
    config["rule_files"] = [str(COMPOSE / mounts[path]) for path in config["rule_files"]]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    result = subprocess.run([promtool, "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_fire_exactly_when_their_unit_tests_say(promtool):
    result = subprocess.run([promtool, "test", "rules", "alerts.test.yml"], cwd=COMPOSE / "prometheus",
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
