#!/bin/bash
# Single-node Kubernetes v1.20.2 test cluster on the local dockerd (see MACHINE-RECIPES section 3).
#   up    build binaries if missing (cached), start etcd/apiserver/controller-manager/scheduler/kubelet
#   down  stop everything by pidfile, remove pod containers and kubelet mounts, remove the state dir
#   env   print `export KUBECONFIG=...`
#   build only build the binaries into the cache dir
set -euo pipefail
CACHE=${BAP_K8S_CACHE:-/var/cache/bap-engine/k8s-1.20}
BIN="$CACHE/bin"
STATE=${BAP_K8S_STATE:-/tmp/bap-k8s}
WORK=${BAP_K8S_BUILD_DIR:-$CACHE/build}
API_PORT=${BAP_K8S_API_PORT:-16443}
ETCD_PORT=${BAP_K8S_ETCD_PORT:-23790}
ETCD_PEER_PORT=${BAP_K8S_ETCD_PEER_PORT:-23800}
NAMESPACE=bap-engines
STORAGE_CLASS=bap-local
HOSTPATH_DIR=/tmp/hostpath_provisioner   # fixed by the in-tree kubernetes.io/host-path provisioner
PAUSE_IMAGE=local/pause:3.2
ROOT=$(cd "$(dirname "$0")/.." && pwd)
COMPONENTS="etcd apiserver kcm sched kubelet"   # start order; stopped in reverse
K8S_SRC_VERSION=1.20.5+really1.20.2-1.1+deb12u1
BINARIES="kube-apiserver kube-controller-manager kube-scheduler kubelet pause"
log() { printf '[k8s-test-cluster] %s\n' "$*" >&2; }

# other helpers/scripts may hold the apt/dpkg locks: wait for them instead of failing
apt_get() {
  local i
  for i in $(seq 1 120); do
    if apt-get -o DPkg::Lock::Timeout=60 "$@"; then return 0; fi
    if ! fuser /var/lib/dpkg/lock-frontend /var/lib/dpkg/lock /var/lib/apt/lists/lock >/dev/null 2>&1 \
       && [ "$i" -gt 3 ]; then return 1; fi
    sleep 5
  done
  return 1
}

have_binaries() { local b; for b in $BINARIES; do [ -x "$BIN/$b" ] || return 1; done; }

ensure_deb_src() {
  if grep -rqs '^Types:.*deb-src' /etc/apt/sources.list.d/ /etc/apt/sources.list 2>/dev/null; then return 0; fi
  # same mirrors/suites as the configured binary sources, as deb-src
  local f out=/etc/apt/sources.list.d/bap-deb-src.sources
  : >"$out.tmp"
  for f in /etc/apt/sources.list.d/*.sources; do
    [ "$f" = "$out" ] && continue
    sed -e 's/^Types:.*/Types: deb-src/' "$f" >>"$out.tmp"; echo >>"$out.tmp"
  done
  mv "$out.tmp" "$out"
  apt_get update -qq
}

build() {
  export DEBIAN_FRONTEND=noninteractive
  local t0=$SECONDS
  ensure_deb_src
  apt_get install -y -qq --no-install-recommends golang-go dpkg-dev rsync jq etcd-server socat gcc libc6-dev >/dev/null
  mkdir -p "$WORK" "$BIN"; cd "$WORK"
  local src="kubernetes-1.20.5+really1.20.2"
  if [ ! -d "$src" ]; then
    apt_get source -qq "kubernetes=$K8S_SRC_VERSION" 2>&1 | grep -v unsandboxed || true
  fi
  cd "$src"
  # Go >= 1.18 fix for vendored github.com/modern-go/reflect2 v1.0.1 (what upstream v1.0.2 does):
  # runtime.hiter must be fully sized and reflect.mapiterinit fills a caller-provided hiter.
  local R=vendor/github.com/modern-go/reflect2
  if [ ! -f "$R/go_above_118.go" ]; then
  python3 - "$R" <<'PY'
import sys, pathlib
r = pathlib.Path(sys.argv[1])
link = r / "unsafe_link.go"; s = link.read_text()
s = s.replace('''// m escapes into the return value, but the caller of mapiterinit
// doesn't let the return value escape.
//go:noescape
//go:linkname mapiterinit reflect.mapiterinit
func mapiterinit(rtype unsafe.Pointer, m unsafe.Pointer) *hiter

''', '')
old_hiter = s[s.index("type hiter struct {"):]
old_hiter = old_hiter[:old_hiter.index("}") + 1]
s = s.replace(old_hiter, '''type hiter struct {
	key         unsafe.Pointer
	value       unsafe.Pointer
	t           unsafe.Pointer
	h           unsafe.Pointer
	buckets     unsafe.Pointer
	bptr        unsafe.Pointer
	overflow    *[]unsafe.Pointer
	oldoverflow *[]unsafe.Pointer
	startBucket uintptr
	offset      uint8
	wrapped     bool
	B           uint8
	i           uint8
	bucket      uintptr
	checkBucket uintptr
}''')
link.write_text(s)
m = r / "unsafe_map.go"; s = m.read_text()
start = s.index("func (type2 *UnsafeMapType) UnsafeIterate(")
end = s.index("\n}\n", start) + 3
m.write_text(s[:start] + s[end:])
(r / "go_above_118.go").write_text('''package reflect2

import "unsafe"

//go:noescape
//go:linkname mapiterinit reflect.mapiterinit
func mapiterinit(rtype unsafe.Pointer, m unsafe.Pointer, it *hiter)

func (type2 *UnsafeMapType) UnsafeIterate(obj unsafe.Pointer) MapIterator {
	var it hiter
	mapiterinit(type2.rtype, *(*unsafe.Pointer)(obj), &it)
	return &UnsafeMapIterator{hiter: &it, pKeyRType: type2.pKeyRType, pElemRType: type2.pElemRType}
}
''')
PY
  fi
  mkdir -p .go/src/k8s.io; [ -L .go/src/k8s.io/kubernetes ] || ln -s ../../.. .go/src/k8s.io/kubernetes
  env GOPATH="$PWD/.go" CGO_ENABLED=0 GOPROXY=off HOME="$WORK/home" \
    make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler cmd/kubelet"
  cp _output/bin/kube-apiserver _output/bin/kube-controller-manager _output/bin/kube-scheduler _output/bin/kubelet "$BIN/"
  gcc -Os -static -o "$BIN/pause" build/pause/linux/pause.c && strip "$BIN/pause"
  log "built Kubernetes binaries into $BIN in $((SECONDS - t0))s"
  if [ "${BAP_K8S_KEEP_BUILD:-0}" != 1 ]; then rm -rf "$WORK"; fi
}


# ---------------------------------------------------------------------------------------------
# run

alive() { [ -f "$STATE/$1.pid" ] && kill -0 "$(cat "$STATE/$1.pid")" 2>/dev/null; }

# start a daemon in its own session (so it outlives this shell's job), pid into $STATE/<name>.pid
spawn() {
  local name=$1; shift
  setsid nohup "$@" >"$STATE/$name.log" 2>&1 </dev/null &
  echo $! >"$STATE/$name.pid"
}

token() { cat "$STATE/token"; }

# kapi METHOD PATH [JSON]: call the apiserver as admin (curl; no kubectl needed)
kapi() {
  local method=$1 path=$2 data=${3:-}
  local args=(-sS --max-time 10 --cacert "$STATE/certs/apiserver.crt" -H "Authorization: Bearer $(token)"
              -X "$method" "https://127.0.0.1:$API_PORT$path")
  if [ -n "$data" ]; then args+=(-H 'Content-Type: application/json' --data-binary "$data"); fi
  curl "${args[@]}"
}

# create an object; "AlreadyExists" is fine
kcreate() {
  local out; out=$(kapi POST "$1" "$2")
  if echo "$out" | jq -e '.kind == "Status" and .status == "Failure" and .reason != "AlreadyExists"' >/dev/null; then
    log "create $1 failed: $(echo "$out" | jq -r .message)"; return 1
  fi
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMPONENT CMD...
  local timeout=$1 what=$2 comp=$3; shift 3
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    if [ -n "$comp" ] && ! alive "$comp"; then log "$comp died while waiting for $what:"; tail -20 "$STATE/$comp.log" >&2; return 1; fi
    if [ "$SECONDS" -ge "$deadline" ]; then log "timeout waiting for $what (see $STATE/*.log)"; return 1; fi
    sleep 0.2
  done
}

ensure_runtime_packages() {
  local missing=()
  command -v etcd >/dev/null || missing+=(etcd-server)
  command -v socat >/dev/null || missing+=(socat)
  command -v jq >/dev/null || missing+=(jq)
  command -v openssl >/dev/null || missing+=(openssl)
  command -v curl >/dev/null || missing+=(curl)
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt_get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

ensure_docker() {
  if ! docker info >/dev/null 2>&1; then
    log "Docker daemon not reachable: running scripts/docker-up.sh"
    "$ROOT/scripts/docker-up.sh"
  fi
  if [ "$(docker info --format '{{.DefaultRuntime}}' 2>/dev/null)" = runc ]; then
    log "WARNING: dockerd's default runtime is runc, not the runc-clamp-oom wrapper: pod sandboxes may fail" \
        "(dockershim asks for oom_score_adj -998; see scripts/docker-up.sh)"
  fi
  if ! docker image inspect "$PAUSE_IMAGE" >/dev/null 2>&1; then
    local d; d=$(mktemp -d)
    cp "$BIN/pause" "$d/pause"
    printf 'FROM scratch\nCOPY pause /pause\nENTRYPOINT ["/pause"]\n' >"$d/Dockerfile"
    docker build -q -t "$PAUSE_IMAGE" "$d" >/dev/null
    rm -rf "$d"
    log "built $PAUSE_IMAGE"
  fi
}

write_kubeconfig() {
  cat >"$STATE/kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters: [{name: bap-test, cluster: {server: "https://127.0.0.1:$API_PORT", certificate-authority: "$STATE/certs/apiserver.crt"}}]
users: [{name: bap-admin, user: {token: "$(token)"}}]
contexts: [{name: bap-test, context: {cluster: bap-test, user: bap-admin, namespace: $NAMESPACE}}]
current-context: bap-test
KC
  chmod 600 "$STATE/kubeconfig"
}

start_control_plane() {
  mkdir -p "$STATE/etcd" "$STATE/certs"
  spawn etcd etcd --name bap --data-dir "$STATE/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "bap=http://127.0.0.1:$ETCD_PEER_PORT" --unsafe-no-fsync
  openssl genrsa -out "$STATE/certs/sa.key" 2048 2>/dev/null
  openssl rsa -in "$STATE/certs/sa.key" -pubout -out "$STATE/certs/sa.pub" 2>/dev/null
  openssl rand -hex 24 >"$STATE/token"; chmod 600 "$STATE/token"
  echo "$(token),bap-admin,bap-admin,system:masters" >"$STATE/tokens.csv"; chmod 600 "$STATE/tokens.csv"
  wait_for 30 etcd etcd curl -fsS "http://127.0.0.1:$ETCD_PORT/health"
  # NodePort range widened to 9000-32767 so engine ports (ORCH_PORT_MIN/MAX 9001-9999) fit in nodeport mode
  spawn apiserver "$BIN/kube-apiserver" \
    --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
    --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$API_PORT" --insecure-port=0 \
    --cert-dir="$STATE/certs" --token-auth-file="$STATE/tokens.csv" --authorization-mode=Node,RBAC \
    --service-account-key-file="$STATE/certs/sa.pub" --service-account-signing-key-file="$STATE/certs/sa.key" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-cluster-ip-range=10.96.0.0/24 --service-node-port-range=9000-32767 \
    --enable-admission-plugins=NamespaceLifecycle,LimitRanger,ServiceAccount,DefaultStorageClass,ResourceQuota
  wait_for 90 apiserver apiserver curl -fsS --cacert "$STATE/certs/apiserver.crt" -H "Authorization: Bearer $(token)" \
    "https://127.0.0.1:$API_PORT/readyz"
  write_kubeconfig
}

start_node() {
  local kc="$STATE/kubeconfig"
  spawn kcm "$BIN/kube-controller-manager" --kubeconfig="$kc" --authentication-kubeconfig="$kc" \
    --authorization-kubeconfig="$kc" --leader-elect=false --bind-address=127.0.0.1 --port=0 --secure-port=10257 \
    --service-account-private-key-file="$STATE/certs/sa.key" --root-ca-file="$STATE/certs/apiserver.crt" \
    --controllers='*,-nodeipam,-cloud-node-lifecycle' --enable-hostpath-provisioner=true
  spawn sched "$BIN/kube-scheduler" --kubeconfig="$kc" --authentication-kubeconfig="$kc" \
    --authorization-kubeconfig="$kc" --leader-elect=false --bind-address=127.0.0.1 --port=0 --secure-port=10259
  mkdir -p "$STATE/kubelet"
  spawn kubelet "$BIN/kubelet" --kubeconfig="$kc" --hostname-override=localhost \
    --root-dir="$STATE/kubelet" --cert-dir="$STATE/kubelet/pki" \
    --container-runtime=docker --pod-infra-container-image="$PAUSE_IMAGE" \
    --cgroup-driver=cgroupfs --cgroups-per-qos=false --enforce-node-allocatable= \
    --fail-swap-on=false --address=127.0.0.1 --port=10250 --read-only-port=0 \
    --healthz-bind-address=127.0.0.1 --authentication-token-webhook=false --anonymous-auth=true \
    --authorization-mode=AlwaysAllow --max-pods=250 \
    --eviction-hard='nodefs.available<1%,imagefs.available<1%,memory.available<100Mi' \
    --image-gc-high-threshold=100 --image-gc-low-threshold=99 --v="${BAP_K8S_KUBELET_V:-2}"
}

node_ready() {
  kapi GET /api/v1/nodes/localhost | jq -e '.status.conditions[] | select(.type == "Ready") | .status == "True"' \
    | grep -q true
}

sa_ready() { kapi GET "/api/v1/namespaces/$NAMESPACE/serviceaccounts/default" | jq -e '.kind == "ServiceAccount"'; }

create_objects() {
  kcreate /api/v1/namespaces "{\"apiVersion\":\"v1\",\"kind\":\"Namespace\",\"metadata\":{\"name\":\"$NAMESPACE\"}}"
  # Storage: the in-tree kubernetes.io/host-path provisioner (controller-manager
  # --enable-hostpath-provisioner) creates one directory per PVC under /tmp/hostpath_provisioner and
  # deletes it when the PVC goes (reclaimPolicy Delete). Single-node only; default class, so
  # storage_class=None works too.
  kcreate /apis/storage.k8s.io/v1/storageclasses "$(jq -nc --arg n "$STORAGE_CLASS" '{apiVersion:"storage.k8s.io/v1",
    kind:"StorageClass", metadata:{name:$n, annotations:{"storageclass.kubernetes.io/is-default-class":"true"}},
    provisioner:"kubernetes.io/host-path", reclaimPolicy:"Delete", volumeBindingMode:"Immediate"}')"
}

print_env() { echo "export KUBECONFIG=$STATE/kubeconfig"; }

is_up() {
  local c; for c in $COMPONENTS; do alive "$c" || return 1; done
  curl -fsS --max-time 5 --cacert "$STATE/certs/apiserver.crt" -H "Authorization: Bearer $(token)" \
    "https://127.0.0.1:$API_PORT/readyz" >/dev/null 2>&1
}

up() {
  [ "$(id -u)" = 0 ] || { log "must run as root"; exit 1; }
  if is_up; then log "already up"; print_env; return 0; fi
  if [ -d "$STATE" ]; then log "stale state in $STATE: cleaning up first"; down; fi
  have_binaries || build
  ensure_runtime_packages
  ensure_docker
  local t0; t0=$(date +%s.%N)
  mkdir -p "$STATE"
  start_control_plane
  local t1; t1=$(date +%s.%N)
  start_node
  create_objects
  wait_for 120 "node Ready" kubelet node_ready
  wait_for 60 "default ServiceAccount in $NAMESPACE" kcm sa_ready
  local t2; t2=$(date +%s.%N)
  awk -v a="$t0" -v b="$t1" -v c="$t2" 'BEGIN { printf "[k8s-test-cluster] apiserver ready %.1fs, node Ready + namespace %.1fs later, total %.1fs\n", b - a, c - b, c - a }' >&2
  print_env
}

stop_pid() {
  local f="$STATE/$1.pid" p i
  [ -f "$f" ] || return 0
  p=$(cat "$f")
  if kill "$p" 2>/dev/null; then
    for i in $(seq 1 150); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$p" 2>/dev/null; then kill -9 "$p" 2>/dev/null || true; fi
  fi
  rm -f "$f"
}

down() {
  local c ids
  for c in $(echo "$COMPONENTS" | tr ' ' '\n' | tac); do stop_pid "$c"; done
  if docker info >/dev/null 2>&1; then
    # pod containers our kubelet (dockershim) left behind
    ids=$(docker ps -aq --filter label=io.kubernetes.pod.namespace)
    if [ -n "$ids" ]; then docker rm -f $ids >/dev/null 2>&1 || true; fi
  fi
  # kubelet mounts (secret, projected, hostPath bind) under its root dir, deepest first
  if [ -d "$STATE" ]; then
    awk -v d="$STATE/" 'index($2, d) == 1 { print $2 }' /proc/mounts | sort -r | while read -r mnt; do
      umount "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null || true
    done
  fi
  rm -rf "$STATE" "$HOSTPATH_DIR" /var/lib/dockershim /var/log/pods /var/log/containers
  log "down"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  env)
    if [ -f "$STATE/kubeconfig" ]; then print_env; else log "not up (no $STATE/kubeconfig)"; exit 1; fi ;;
  build) have_binaries || build ;;
  *) echo "usage: $0 up|down|env|build" >&2; exit 2 ;;
esac
