#!/usr/bin/env bash
# Checks the deployment artifacts under deploy/ with the real tools.
#
#   ci/check-deploy.sh [SCRAPE_FILE]
#
# SCRAPE_FILE: optional output of `curl -s http://127.0.0.1:9464/metrics` from a daemon that has
# synced some rows. With it, every prism_sync_* name used by the dashboard and the alerts must be
# exported in it, and `promtool check metrics` lints it; without it, names are checked against the
# list in this script (the telemetry contract, DESIGN.md "Telemetry").
#
# Installs what is missing (as root, like CI):
#   - promtool: Debian's `prometheus` package (--no-install-recommends; `apt-get update` only when
#     the package is not known yet or its install fails). The package's service is not started in
#     containers (policy-rc.d) and nothing here starts it.
#   - kubernetes-validate (pinned), from PyPI into a venv under
#     ${XDG_CACHE_HOME:-$HOME/.cache}/prism-sync-ci/venv; it ships the Kubernetes JSON schemas, so
#     validation works offline.
# Uses what is on the machine: systemd-analyze (verify, security --offline), systemd-sysusers,
# kubectl (for `kubectl kustomize`; a standalone `kustomize` also works).
#
# Every check runs even if an earlier one failed; the last line is "check-deploy: N passed, M failed"
# and the exit status is non-zero if any failed.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SCRAPE=""
if [[ $# -gt 0 ]]; then
  [[ -r $1 ]] || { echo "check-deploy: cannot read scrape file $1" >&2; exit 2; }
  SCRAPE=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
fi
cd "$ROOT"

KUBERNETES_VALIDATE_VERSION=1.37.0
# Kubernetes versions the manifests are validated against: the oldest we claim to support and the
# newest schema kubernetes-validate ships.
K8S_VERSIONS=(1.29.0 1.37.0)
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/prism-sync-ci
VENV=$CACHE/venv
WORK=$(mktemp -d "${TMPDIR:-/tmp}/check-deploy.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# The metrics prism-sync exports (DESIGN.md "Telemetry" and issue 5), as NAME TYPE.
EXPECTED_METRICS="
prism_sync_items_total counter
prism_sync_item_errors_total counter
prism_sync_batches_total counter
prism_sync_http_requests_total counter
prism_sync_http_request_duration_seconds histogram
prism_sync_idempotent_replays_total counter
prism_sync_rows gauge
prism_sync_dead_rows gauge
prism_sync_oldest_pending_age_seconds gauge
prism_sync_oldest_batch_key_age_seconds gauge
prism_sync_batches_in_flight gauge
prism_sync_rows_held_back gauge
prism_sync_watermark_lag_seconds gauge
prism_sync_credentials_refused gauge
prism_sync_team_items_total counter
prism_sync_team_credentials_refused gauge
prism_sync_operator_replayed_rows_total counter
prism_sync_last_progress_timestamp_seconds gauge
prism_sync_build_info gauge
"
POSTGRES_ONLY_METRICS="prism_sync_watermark_lag_seconds"

note() { echo "  $*"; }

# ---------------------------------------------------------------------------------------------
# Tools

ensure_promtool() {
  command -v promtool >/dev/null && return 0
  if [[ $(id -u) -ne 0 ]]; then
    echo "check-deploy: promtool is missing; install Debian's prometheus package (needs root)" >&2
    return 1
  fi
  local start=$SECONDS
  export DEBIAN_FRONTEND=noninteractive
  local install=(apt-get install -y -qq --no-install-recommends prometheus)
  if ! apt-cache show prometheus >/dev/null 2>&1; then
    apt-get update -qq
  fi
  if ! "${install[@]}" >"$WORK/apt.log" 2>&1; then
    apt-get update -qq
    "${install[@]}" >"$WORK/apt.log" 2>&1 || { cat "$WORK/apt.log" >&2; return 1; }
  fi
  note "installed promtool (apt-get install prometheus) in $((SECONDS - start))s"
}

ensure_kubernetes_validate() {
  if [[ -x $VENV/bin/kubernetes-validate ]] &&
     "$VENV/bin/kubernetes-validate" --version 2>/dev/null | grep -q "$KUBERNETES_VALIDATE_VERSION"; then
    return 0
  fi
  local start=$SECONDS
  mkdir -p "$CACHE"
  [[ -x $VENV/bin/python ]] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check \
    "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" >"$WORK/pip.log" 2>&1 ||
    { cat "$WORK/pip.log" >&2; return 1; }
  note "installed kubernetes-validate $KUBERNETES_VALIDATE_VERSION into $VENV in $((SECONDS - start))s"
}

# kustomize renderer: kubectl's built-in one, or a standalone kustomize. Neither is on PyPI or
# Debian bookworm; if both are missing, the manifest files are validated one by one instead
# (generated ConfigMaps, labels and the SQLite overlay's patches are then not covered).
KUSTOMIZE=()
find_kustomize() {
  if command -v kubectl >/dev/null && kubectl kustomize --help >/dev/null 2>&1; then
    KUSTOMIZE=(kubectl kustomize)
  elif command -v kustomize >/dev/null; then
    KUSTOMIZE=(kustomize build)
  fi
}

# ---------------------------------------------------------------------------------------------
# Checks. Each runs in a subshell with errexit on; its output is printed indented.

check_rules() {
  promtool check rules deploy/prometheus/alerts.yml
}

# As a user runs them: from the repository root and from deploy/prometheus (rule_files is
# relative to the test file). The tests pin the annotations too.
check_rule_tests() {
  promtool test rules deploy/prometheus/alerts.test.yml
  (cd deploy/prometheus && promtool test rules alerts.test.yml)
}

# Every `prism-sync VERB ...` command that alerts.yml tells an operator to run (annotations and
# comments, across line breaks) must exist: the verb, and each of its --flags in the verb's --help.
check_runbook_commands() {
  local bin
  bin=$(prism_sync_bin)
  if [[ -z $bin ]]; then
    echo "skipped: no built prism-sync (set PRISM_SYNC_BIN or build first)"
    return 0
  fi
  sed -e 's/^[[:space:]]*#*[[:space:]]*//' deploy/prometheus/alerts.yml | tr '\n' ' ' |
    grep -oE '`prism-sync [^`]*`' | tr -d '`' | sort -u >"$WORK/commands"
  local cmd verb help flag bad=0
  while read -r cmd; do
    verb=$(awk '{print $2}' <<<"$cmd")
    if ! help=$("$bin" "$verb" --help 2>&1); then
      echo "$cmd: prism-sync has no verb $verb"; bad=1; continue
    fi
    for flag in $(grep -oE -- '--[a-z][a-z-]*' <<<"$cmd"); do
      if ! grep -qE -- "(^|[[:space:]])$flag([[:space:]=<]|$)" <<<"$help"; then
        echo "$cmd: prism-sync $verb has no $flag"; bad=1
      fi
    done
  done <"$WORK/commands"
  echo "$(wc -l <"$WORK/commands") commands checked against ${bin#"$ROOT"/}"
  return $bad
}

# Structure of the dashboard, and every panel query through promtool's PromQL parser (as
# recording rules, with Grafana's variables substituted).
check_dashboard() {
  "$VENV/bin/python" - deploy/grafana/prism-sync.json "$WORK/dashboard-rules.yml" <<'PY'
import json, sys, yaml
path, out = sys.argv[1], sys.argv[2]
d = json.load(open(path))
problems = []
if not 36 <= d.get("schemaVersion", 0) <= 41:
    problems.append(f"schemaVersion {d.get('schemaVersion')} (expected ~39)")
if d.get("id") is not None:
    problems.append("id must be null in an importable dashboard")
if not d.get("uid"):
    problems.append("no uid")
variables = {v["name"]: v for v in d["templating"]["list"]}
for name in ("datasource", "job", "instance"):
    if name not in variables:
        problems.append(f"no ${name} template variable")
if variables.get("datasource", {}).get("type") != "datasource":
    problems.append("$datasource is not a datasource variable")
ids, cells, rules = set(), {}, []
for p in d["panels"]:
    if p["id"] in ids:
        problems.append(f"duplicate panel id {p['id']}")
    ids.add(p["id"])
    g = p["gridPos"]
    if g["x"] + g["w"] > 24:
        problems.append(f"panel {p['title']!r} is wider than the grid")
    area = [(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])]
    taken = [cells[xy] for xy in area if xy in cells]
    if taken:
        problems.append(f"panel {p['title']!r} overlaps {taken[0]!r}")
    cells.update((xy, p["title"]) for xy in area)
    if p["type"] == "row":
        continue
    if p.get("datasource", {}).get("uid") != "${datasource}":
        problems.append(f"panel {p['title']!r} does not use the $datasource variable")
    if not p.get("targets"):
        problems.append(f"panel {p['title']!r} has no query")
    for t in p.get("targets", []):
        if t.get("datasource", {}).get("uid") != "${datasource}":
            problems.append(f"panel {p['title']!r} query {t['refId']} does not use $datasource")
        expr = t["expr"]
        for var, value in (("$__rate_interval", "5m"), ("$__range", "1h"), ("$job", ".*"), ("$instance", ".*")):
            expr = expr.replace(var, value)
        if "$" in expr:
            problems.append(f"panel {p['title']!r}: unknown variable in {t['expr']}")
        rules.append({"record": f"dashboard:panel_{p['id']}:{t['refId']}", "expr": expr})
yaml.safe_dump({"groups": [{"name": "dashboard-queries", "rules": rules}]}, open(out, "w"))
print(f"{len(d['panels'])} panels, {len(rules)} queries, variables: {', '.join(variables)}")
if problems:
    print("\n".join(problems))
    sys.exit(1)
PY
  promtool check rules "$WORK/dashboard-rules.yml" | sed 's#'"$WORK"'/##'
}

# Every prism_sync_* name in the dashboard and the alert rules (queries, descriptions, comments)
# must be one the daemon exports: in the scrape file if given, else in EXPECTED_METRICS.
check_metric_names() {
  local known="$WORK/known-names" used="$WORK/used-names"
  if [[ -n $SCRAPE ]]; then
    # Sample names, plus the family names in # HELP / # TYPE lines. A histogram's _bucket/_sum/
    # _count appear as samples, so a summary where a histogram is expected fails here.
    { grep -v '^#' "$SCRAPE" | grep -oE '^[a-zA-Z_:][a-zA-Z0-9_:]*' || true
      grep -E '^# (HELP|TYPE) ' "$SCRAPE" | awk '{print $3}'
    } | sort -u >"$known"
    echo "names from $SCRAPE: $(grep -c '^prism_sync_' "$known" || true) prism_sync_* names"
  else
    echo "$EXPECTED_METRICS" | awk 'NF {
      print $1
      if ($2 == "histogram") { print $1 "_bucket"; print $1 "_sum"; print $1 "_count" } }' |
      sort -u >"$known"
    echo "names from the embedded contract list ($(echo "$EXPECTED_METRICS" | grep -c prism_sync_) metrics)"
  fi
  grep -ohE 'prism_sync_[a-zA-Z0-9_]+' deploy/grafana/prism-sync.json deploy/prometheus/alerts.yml |
    sort -u >"$used"
  local missing
  missing=$(comm -23 "$used" "$known")
  # Postgres-only metrics may be absent from the scrape of a daemon on SQLite.
  if [[ -n $SCRAPE && -n $missing ]]; then
    local name
    for name in $POSTGRES_ONLY_METRICS; do
      if grep -qx "$name" <<<"$missing"; then
        echo "warning: $name is not in the scrape (Postgres only; fine for a daemon on SQLite)"
        missing=$(grep -vx "$name" <<<"$missing" || true)
      fi
    done
  fi
  echo "dashboard and alerts use $(wc -l <"$used") distinct names"
  if [[ -n $missing ]]; then
    echo "not exported:"
    while read -r name; do echo "  $name"; done <<<"$missing"
    return 1
  fi
  local unused
  unused=$(echo "$EXPECTED_METRICS" | awk 'NF {print $1}' | sort -u | comm -23 - "$used" || true)
  if [[ -n $unused ]]; then echo "exported but not shown anywhere: $unused"; fi
}

check_scrape_lint() {
  promtool check metrics <"$SCRAPE"
}

# systemd-analyze verify needs ExecStart's binary to exist and be executable, so it verifies a
# copy of the unit whose ExecStart points at a built prism-sync (or, before any build, at a stub
# script: verify only looks at the file). Verify exits 0 on unknown keys and bad values, printing
# only a warning; any output therefore counts as a failure.
# A built prism-sync: PRISM_SYNC_BIN, else target/{release,debug}/prism-sync; empty if none.
prism_sync_bin() {
  if [[ -n ${PRISM_SYNC_BIN:-} ]]; then
    realpath "$PRISM_SYNC_BIN"
    return 0
  fi
  local candidate
  for candidate in target/release/prism-sync target/debug/prism-sync; do
    if [[ -x $candidate ]]; then echo "$ROOT/$candidate"; return 0; fi
  done
}

check_systemd_verify() {
  local bin
  bin=$(prism_sync_bin)
  if [[ -z $bin ]]; then
    bin=$WORK/bin/prism-sync
    mkdir -p "$WORK/bin"
    printf '#!/bin/sh\nexit 0\n' >"$bin"
    chmod +x "$bin"
    echo "no built prism-sync found; verifying against a stub executable"
  else
    echo "ExecStart binary for verification: ${bin#"$ROOT"/}"
  fi
  mkdir -p "$WORK/unit"
  sed "s#^ExecStart=/usr/local/bin/prism-sync #ExecStart=$bin #" \
    deploy/systemd/prism-sync.service >"$WORK/unit/prism-sync.service"
  grep -q "^ExecStart=$bin run" "$WORK/unit/prism-sync.service"
  local out
  out=$(cd "$WORK/unit" && systemd-analyze verify --man=no prism-sync.service 2>&1)
  if [[ -n $out ]]; then
    echo "$out"
    return 1
  fi
  echo "systemd-analyze verify: clean"
  # Hardening as systemd scores it (exposure 0 = fully locked down, 10 = not at all); fail above
  # 2.0 to catch regressions. --threshold takes the exposure times ten.
  systemd-analyze security --offline=true --threshold=20 "$WORK/unit/prism-sync.service" |
    tail -n 1 | sed 's#'"$WORK"'/unit/##'
  # (an absolute path: a relative one is looked up in the sysusers.d directories)
  out=$(systemd-sysusers --dry-run "$ROOT/deploy/systemd/prism-sync.sysusers" 2>&1) || { echo "$out"; return 1; }
  echo "systemd-sysusers --dry-run deploy/systemd/prism-sync.sysusers: ok"
  # The stop timeout must leave room for the drain (shutdown.grace_period, default 30s).
  local stop
  stop=$(sed -n 's/^TimeoutStopSec=\([0-9]*\)s$/\1/p' deploy/systemd/prism-sync.service)
  [[ -n $stop && $stop -gt 30 ]] || { echo "TimeoutStopSec must exceed the 30s grace period"; return 1; }
}

render() { # render DIR OUT
  "${KUSTOMIZE[@]}" "$1" >"$2"
}

check_kustomize_render() {
  if [[ ${#KUSTOMIZE[@]} -eq 0 ]]; then
    echo "no kubectl or kustomize: validating the listed resource files one by one"
    "$VENV/bin/python" - deploy/kubernetes/base/kustomization.yaml <<'PY' >"$WORK/files"
import os, sys, yaml
k = yaml.safe_load(open(sys.argv[1]))
for r in k["resources"]:
    print(os.path.join(os.path.dirname(sys.argv[1]), r))
PY
    : >"$WORK/rendered.yaml"
    while read -r f; do
      { cat "$f"; echo "---"; } >>"$WORK/rendered.yaml"
    done <"$WORK/files"
    return 0
  fi
  render deploy/kubernetes/base "$WORK/base.yaml"
  render deploy/kubernetes/overlays/sqlite "$WORK/sqlite.yaml"
  echo "${KUSTOMIZE[*]} deploy/kubernetes/base: $(grep -c '^kind:' "$WORK/base.yaml") resources"
  echo "${KUSTOMIZE[*]} deploy/kubernetes/overlays/sqlite: $(grep -c '^kind:' "$WORK/sqlite.yaml") resources"
}

# kubernetes-validate --strict (unknown fields are errors) against each Kubernetes version. It has
# no schema for the ServiceMonitor CRD and only warns about it; that resource gets its own check.
check_kubernetes_validate() {
  local files=(deploy/kubernetes/base/secret.example.yaml)
  if [[ -s $WORK/base.yaml ]]; then
    files+=("$WORK/base.yaml" "$WORK/sqlite.yaml")
  else
    files+=("$WORK/rendered.yaml")
  fi
  local v out status
  for v in "${K8S_VERSIONS[@]}"; do
    status=0
    out=$("$VENV/bin/kubernetes-validate" --strict -k "$v" "${files[@]}" 2>&1) || status=$?
    out=${out//"$WORK"\//}
    # The only tolerated warning is the missing CRD schema.
    if [[ $status -ne 0 ]] || echo "$out" | grep -v "^INFO" | grep -qv "Couldn't find schema for kind ServiceMonitor"; then
      echo "$out"
      return 1
    fi
    echo "kubernetes $v: $(echo "$out" | grep -c '^INFO.*passed') resources passed"
  done
}

# The ServiceMonitor against the fields of monitoring.coreos.com/v1 it uses (the CRD's own
# patterns), and the references between the rendered resources that no schema can see: selectors
# that must match, named ports, ConfigMaps, Secret keys, the API key file path, shutdown timing.
check_kubernetes_consistency() {
  if [[ ! -s $WORK/base.yaml ]]; then
    echo "skipped: needs the rendered manifests"
    return 0
  fi
  "$VENV/bin/python" - "$WORK/base.yaml" "$WORK/sqlite.yaml" deploy/kubernetes/base/secret.example.yaml \
    deploy/kubernetes/base/prism-sync.toml <<'PY'
import re, sys, tomllib, yaml, jsonschema

DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
SERVICE_MONITOR = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object", "additionalProperties": False, "required": ["selector", "endpoints"],
            "properties": {
                "jobLabel": {"type": "string"},
                "namespaceSelector": {"type": "object"},
                "selector": {"type": "object", "additionalProperties": False,
                             "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
                                            "matchExpressions": {"type": "array"}}},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False,
                    "properties": {
                        "port": {"type": "string"}, "targetPort": {}, "path": {"type": "string"},
                        "scheme": {"enum": ["http", "https"]},
                        "interval": {"type": "string", "pattern": DURATION},
                        "scrapeTimeout": {"type": "string", "pattern": DURATION},
                        "honorLabels": {"type": "boolean"}, "relabelings": {"type": "array"},
                        "metricRelabelings": {"type": "array"}}}},
            }},
    },
}

problems = []
def check(ok, message):
    if not ok:
        problems.append(message)

def matches(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())

def seconds(text):
    m = re.fullmatch(r"(\d+)(ms|s|m)", text)
    return int(m[1]) * {"ms": 0.001, "s": 1, "m": 60}[m[2]]

secret = yaml.safe_load(open(sys.argv[3]))
secret_keys = set(secret["stringData"])
grace = seconds(tomllib.load(open(sys.argv[4], "rb"))["shutdown"]["grace_period"])

for variant, path in (("base", sys.argv[1]), ("sqlite", sys.argv[2])):
    docs = [d for d in yaml.safe_load_all(open(path)) if d]
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    configmaps = {d["metadata"]["name"] for d in by_kind.get("ConfigMap", [])}
    deploy, = by_kind["Deployment"]
    pod = deploy["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    c, = pod["spec"]["containers"]
    port_names = {p["name"] for p in c["ports"]}
    check(matches(deploy["spec"]["selector"]["matchLabels"], pod_labels), f"{variant}: Deployment selector misses its pods")
    svc, = by_kind["Service"]
    check(matches(svc["spec"]["selector"], pod_labels), f"{variant}: Service selects no daemon pod")
    for sm in by_kind.get("ServiceMonitor", []):
        try:
            jsonschema.validate(sm, SERVICE_MONITOR)
        except jsonschema.ValidationError as e:
            problems.append(f"{variant}: ServiceMonitor: {e.message} at {list(e.path)}")
        check(matches(sm["spec"]["selector"]["matchLabels"], svc["metadata"].get("labels", {})),
              f"{variant}: ServiceMonitor selects no Service")
        svc_ports = {p["name"] for p in svc["spec"]["ports"]}
        for ep in sm["spec"]["endpoints"]:
            check(ep["port"] in svc_ports, f"{variant}: ServiceMonitor port {ep['port']} not in the Service")
    pdb, = by_kind["PodDisruptionBudget"]
    check(matches(pdb["spec"]["selector"]["matchLabels"], pod_labels), f"{variant}: PDB selects no daemon pod")
    for job in by_kind.get("Job", []):
        job_labels = job["spec"]["template"]["metadata"]["labels"]
        check(not matches(svc["spec"]["selector"], job_labels), f"{variant}: the Service would select the migration Job")
        check(not matches(pdb["spec"]["selector"]["matchLabels"], job_labels), f"{variant}: the PDB would cover the migration Job")
        check(job["spec"]["template"]["spec"]["containers"][0]["args"] == ["migrate"], f"{variant}: the Job does not run `migrate`")
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        check(probe in c, f"{variant}: no {probe}")
        if probe in c:
            check(c[probe]["httpGet"]["port"] in port_names, f"{variant}: {probe} port is not a container port")
    check(c["livenessProbe"]["httpGet"]["path"] in ("/livez", "/healthz"), f"{variant}: liveness must probe /livez")
    check(c["readinessProbe"]["httpGet"]["path"] == "/readyz", f"{variant}: readiness must probe /readyz")
    # References to ConfigMaps, Secret keys and files.
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    for v in volumes.values():
        if "configMap" in v:
            check(v["configMap"]["name"] in configmaps, f"{variant}: volume {v['name']} names a missing ConfigMap")
        if "secret" in v:
            for item in v["secret"].get("items", []):
                check(item["key"] in secret_keys, f"{variant}: secret key {item['key']} not in secret.example.yaml")
    for ref in c.get("envFrom", []):
        check(ref["configMapRef"]["name"] in configmaps, f"{variant}: envFrom names a missing ConfigMap")
    env = {e["name"]: e for e in c.get("env", [])}
    for e in env.values():
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            check(ref["key"] in secret_keys, f"{variant}: env {e['name']} uses secret key {ref['key']} not in secret.example.yaml")
    key_file = env.get("PRISM_SYNC__MICRO__API_KEY_FILE", {}).get("value", "")
    check(key_file == f"{mounts.get('api-key')}/micro-api-key", f"{variant}: PRISM_SYNC__MICRO__API_KEY_FILE is not the mounted key")
    check("MICRO_API_KEY" not in env, f"{variant}: the API key must not be an environment variable")
    args = c["args"]
    check("--config" in args and args[args.index("--config") + 1].startswith(mounts.get("config", "?") + "/"),
          f"{variant}: --config does not point into the config volume")
    # Pod hardening.
    psc, csc = pod["spec"]["securityContext"], c["securityContext"]
    check(psc.get("runAsNonRoot") and psc.get("runAsUser") == 65532, f"{variant}: not runAsNonRoot/65532")
    check(psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{variant}: no RuntimeDefault seccomp")
    check(csc.get("readOnlyRootFilesystem") and csc.get("allowPrivilegeEscalation") is False
          and csc.get("capabilities", {}).get("drop") == ["ALL"], f"{variant}: container not locked down")
    check(mounts.get("tmp") == "/tmp", f"{variant}: no writable /tmp")
    # Shutdown: the kubelet must wait longer than the daemon drains.
    check(pod["spec"]["terminationGracePeriodSeconds"] > grace,
          f"{variant}: terminationGracePeriodSeconds must exceed shutdown.grace_period ({grace}s)")
    # Replicas per database.
    if variant == "base":
        check(deploy["spec"]["replicas"] >= 2 and "--no-migrate" in args and "Job" in by_kind,
              "base: expected >= 2 replicas, run --no-migrate and a migration Job")
        check(env["DATABASE_URL"]["valueFrom"]["secretKeyRef"]["key"] == "database-url", "base: DATABASE_URL not from the Secret")
    else:
        check(deploy["spec"]["replicas"] == 1 and deploy["spec"]["strategy"] == {"type": "Recreate"},
              "sqlite: expected exactly 1 replica and strategy Recreate (without rollingUpdate)")
        check("Job" not in by_kind and "--no-migrate" not in args, "sqlite: the daemon must migrate itself, without a Job")
        check(env["DATABASE_URL"].get("value", "").startswith("sqlite:///") and "valueFrom" not in env["DATABASE_URL"],
              "sqlite: DATABASE_URL must be an absolute sqlite path")
        data = volumes.get("data", {}).get("persistentVolumeClaim", {}).get("claimName")
        check(data in {d["metadata"]["name"] for d in by_kind.get("PersistentVolumeClaim", [])}, "sqlite: no PVC for the database")
        check(env["DATABASE_URL"].get("value", "").startswith(f"sqlite://{mounts.get('data')}/"), "sqlite: database not on the volume")
    print(f"{variant}: {len(docs)} resources cross-checked")

if problems:
    print("\n".join(problems))
    sys.exit(1)
PY
}

# ---------------------------------------------------------------------------------------------

PASSED=0
FAILED=0
run_check() { # run_check TITLE FUNCTION
  local title=$1 rc=0
  set +e
  ( set -e; "$2" ) >"$WORK/out" 2>&1
  rc=$?
  set -e
  if [[ $rc -eq 0 ]]; then
    PASSED=$((PASSED + 1)); echo "ok   $title"
  else
    FAILED=$((FAILED + 1)); echo "FAIL $title"
  fi
  sed -e '/^[[:space:]]*$/d' -e 's/^/       /' "$WORK/out"
}

echo "check-deploy: tools"
ensure_promtool
ensure_kubernetes_validate
find_kustomize
note "promtool: $(promtool --version 2>&1 | head -n 1)"
note "kubernetes-validate: $("$VENV/bin/kubernetes-validate" --version 2>&1)"
note "systemd-analyze: $(systemd-analyze --version | head -n 1)"
note "kustomize: ${KUSTOMIZE[*]:-none}"

echo "check-deploy: checks"
run_check "promtool check rules deploy/prometheus/alerts.yml" check_rules
run_check "promtool test rules deploy/prometheus/alerts.test.yml" check_rule_tests
run_check "runbook commands in deploy/prometheus/alerts.yml exist in the CLI" check_runbook_commands
run_check "dashboard deploy/grafana/prism-sync.json (structure, PromQL)" check_dashboard
if [[ -n $SCRAPE ]]; then
  run_check "metric names in dashboard and alerts are exported (scrape file)" check_metric_names
  run_check "promtool check metrics on the scrape file" check_scrape_lint
else
  run_check "metric names in dashboard and alerts are exported (contract list)" check_metric_names
fi
run_check "systemd-analyze verify deploy/systemd/prism-sync.service" check_systemd_verify
run_check "kustomize build base and overlays/sqlite" check_kustomize_render
run_check "kubernetes-validate --strict (${K8S_VERSIONS[*]})" check_kubernetes_validate
run_check "kubernetes cross-references, ServiceMonitor, hardening" check_kubernetes_consistency

echo "check-deploy: $PASSED passed, $FAILED failed"
[[ $FAILED -eq 0 ]]
