#!/usr/bin/env bash
# `make image-test`: build the server image here with podman and stream a real
# conversation through a container of it with the project's client.
#
#   1. the base image debian:bookworm-slim (image/base.sh: debootstrap, when
#      no registry has it), the wheelhouse (image/wheelhouse.sh) and the
#      model (image/stage-model.sh);
#   2. `podman build` of the Dockerfile (timed);
#   3. `podman run -d` with a token and the port published; waits for the
#      liveness probe (/-/healthz) and readiness (/healthz ok, direct route),
#      checks the token, the HEALTHCHECK and the read-only code and model;
#   4. `diglett-client stream` of a two-speaker conversation cut from the
#      dev set's real speech, and asserts that each turn's labels name its
#      speaker (image/conversation.py); prints build time, image size and
#      the labels; removes the container (KEEP=1 keeps it).
#
# Several minutes and ~10 GB of disk (the CUDA variant: a 6 GB image), so
# it is its own target, not part of `make test`. Settings (environment):
# VARIANT=cuda|cpu, IMAGE=localhost/diglett:$VARIANT, PORT (host port,
# default: a free one), BUILD_ARGS (extra `podman build` flags, e.g.
# --no-cache), SPEED (client pace, × real time; default 1), KEEP=1.
set -euo pipefail
cd "$(dirname "$0")/.."
export CONTAINERS_CONF="${CONTAINERS_CONF:-$PWD/image/containers.conf}"
VARIANT="${VARIANT:-cuda}"
IMAGE="${IMAGE:-localhost/diglett:$VARIANT}"
SPEED="${SPEED:-1}"
PY=.venv/bin/python
CLIENT=.venv/bin/diglett-client
TOKEN="image-test-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
NAME="diglett-image-test-$$"
WORK="$(mktemp -d /var/tmp/diglett-image-test.XXXXXX)"
say() { printf '\n== %s\n' "$*"; }

cleanup() {
  local rc=$?
  if podman container exists "$NAME" 2>/dev/null; then
    if ((rc != 0)); then
      say "container log (last 60 lines)"
      podman logs --tail 60 "$NAME" 2>&1 || true
    fi
    if [[ -n "${KEEP:-}" ]]; then
      echo "kept container $NAME (podman rm -f $NAME)"
    else
      podman stop -t 30 "$NAME" >/dev/null 2>&1 || true
      podman rm -f "$NAME" >/dev/null 2>&1 || true
    fi
  fi
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT

for tool in podman runc debootstrap; do
  command -v "$tool" >/dev/null || {
    echo "image-test: $tool missing: apt-get install -y podman runc debootstrap" >&2
    exit 1
  }
done

say "inputs"
"$PY" image/lock.py --check || echo "image-test: warning: requirements.lock differs" \
  "from the installed .venv (regenerate: $PY image/lock.py)"
t=$SECONDS
image/base.sh
t_base=$((SECONDS - t))
t=$SECONDS
image/wheelhouse.sh "$VARIANT"
t_wheels=$((SECONDS - t))
t=$SECONDS
image/stage-model.sh
t_model=$((SECONDS - t))

say "build $IMAGE (VARIANT=$VARIANT)"
t=$SECONDS
# --format docker: OCI images carry no HEALTHCHECK. --isolation chroot: RUN
# steps need no runtime features beyond a chroot. --pull=never: the base is
# local (image/base.sh).
# shellcheck disable=SC2086
podman build --format docker --isolation chroot --pull=never \
  --build-arg VARIANT="$VARIANT" ${BUILD_ARGS:-} -t "$IMAGE" . >"$WORK/build.log" 2>&1 || {
  tail -40 "$WORK/build.log"
  exit 1
}
t_build=$((SECONDS - t))
cached=$(grep -c -- '--> Using cache' "$WORK/build.log" || true)
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
echo "built in ${t_build} s ($cached steps from cache); image $((size / 1000000)) MB"

say "run"
if [[ -z "${PORT:-}" ]]; then
  PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
# (Without systemd podman cannot schedule the HEALTHCHECK and says so; the
# check itself runs below with `podman healthcheck run`.)
podman run -d --name "$NAME" -p "127.0.0.1:$PORT:8000" --shm-size=2g \
  -e DIGLETT_API_TOKEN="$TOKEN" "$IMAGE" 2> >(grep -v 'systemd connection' >&2) >/dev/null
base="http://127.0.0.1:$PORT"
t=$SECONDS
live="" ready="" early=""
while ((SECONDS - t < 600)); do
  if [[ "$(podman inspect --format '{{.State.Running}}' "$NAME")" != true ]]; then
    echo "image-test: the container stopped" >&2
    exit 1
  fi
  codes=$("$PY" - "$base" <<'EOF'
import json, sys, urllib.error, urllib.request as u
out = []
for path, timeout in (("/-/healthz", 3), ("/healthz", 8)):
    try:
        with u.urlopen(sys.argv[1] + path, timeout=timeout) as r:
            body = r.read().decode()
            out.append(f"{r.status}:{json.loads(body).get('route', '') if path == '/healthz' else ''}")
    except urllib.error.HTTPError as e:
        out.append(str(e.code))
    except Exception:
        out.append("down")
print(" ".join(out))
EOF
  )
  read -r c_live c_ready <<<"$codes"
  [[ -z "$live" && "$c_live" == 200* ]] && live=$((SECONDS - t))
  [[ "$c_live" == 200* && "$c_ready" != "200:direct" && "$c_ready" != "200:proxy" ]] && early="$c_ready"
  if [[ "$c_ready" == "200:direct" ]]; then
    ready=$((SECONDS - t))
    break
  fi
  sleep 1
done
[[ -n "$ready" ]] || {
  echo "image-test: not ready after 600 s (/-/healthz $c_live, /healthz $c_ready)" >&2
  exit 1
}
echo "liveness /-/healthz 200 after ${live} s; readiness /healthz ok (direct) after ${ready} s" \
  "${early:+(while liveness was 200, /healthz answered: $early)}"

say "checks"
"$PY" - "$base" "$TOKEN" <<'EOF'
import sys, urllib.error, urllib.request as u
base, token = sys.argv[1:]
def status(path, headers={}):
    try:
        with u.urlopen(u.Request(base + path, headers=headers), timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
no, yes = status("/v1/info"), status("/v1/info", {"Authorization": f"Bearer {token}"})
print(f"/v1/info without token: {no}, with token: {yes}")
assert (no, yes) == (401, 200), (no, yes)
EOF
podman healthcheck run "$NAME" && echo "HEALTHCHECK (podman healthcheck run): healthy"
podman exec "$NAME" sh -c '
  id
  for p in /opt/diglett/app/diglett /opt/diglett/venv /opt/diglett/model; do
    if touch "$p/.w" 2>/dev/null; then echo "writable: $p"; exit 1; fi
  done
  touch /opt/diglett/cache/.w && rm /opt/diglett/cache/.w
  echo "code, venv and model read-only to $(id -un); cache $DIGLETT_CACHE_DIR writable"
  python -c "import torch; print(\"torch\", torch.__version__, \"cuda available:\", torch.cuda.is_available())"
'

say "stream a conversation through the container (${SPEED}x real time)"
DIGLETT_SPEAKERS="${DIGLETT_SPEAKERS:-$(cd .. && pwd)/shared/data/speakers}" \
  "$PY" image/conversation.py make "$WORK/conv"
t=$SECONDS
DIGLETT_SESSION_FILE="$WORK/session.json" "$CLIENT" stream --url "ws://127.0.0.1:$PORT/v1/stream" --token "$TOKEN" \
  --enroll "alice=$WORK/conv/alice.wav" --enroll "bob=$WORK/conv/bob.wav" \
  --speed "$SPEED" --timeline "$WORK/timeline.json" "$WORK/conv/conv.wav" \
  >"$WORK/client.log" 2>&1 || {
  cat "$WORK/client.log"
  exit 1
}
t_stream=$((SECONDS - t))
grep -E '^(enrolled|summary|server summary)' "$WORK/client.log" || true
labels_ok=0
"$PY" image/conversation.py check "$WORK/conv/turns.json" "$WORK/timeline.json" || labels_ok=$?

say "liveness without the embedding tier"
# Kill the embedding replica (the GPU tier's place): /healthz (readiness)
# fails until Serve has replaced it, /-/healthz (liveness) must not.
podman exec "$NAME" python -c '
import ray
from ray.util.state import list_actors
ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
for a in list_actors(filters=[("state", "=", "ALIVE")]):
    if "EmbeddingDeployment" in (a.class_name or ""):
        ray.kill(ray.get_actor(a.name, namespace="serve"), no_restart=True)
        print("killed", a.name)
        break
' 2>&1 | grep -v -E '^\s*$|WARNING' || true
"$PY" - "$base" <<'EOF2'
import sys, time, urllib.error, urllib.request as u
def code(path, timeout):
    try:
        with u.urlopen(sys.argv[1] + path, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except Exception:
        return 0
polls = []
for _ in range(20):
    polls.append((code("/-/healthz", 3), code("/healthz", 2)))
    time.sleep(0.5)
down = [live for live, ready in polls if ready != 200]
print(f"{len(polls)} polls: /healthz not ok in {len(down)}; /-/healthz then "
      f"{down.count(200)}x 200; /-/healthz 200 in {sum(l == 200 for l, _ in polls)}")
assert sum(l == 200 for l, _ in polls) >= len(polls) - 2, polls
EOF2

say "result"
echo "base ${t_base} s, wheelhouse ${t_wheels} s, model ${t_model} s," \
  "build ${t_build} s ($cached steps cached), image $((size / 1000000)) MB ($IMAGE)"
echo "container: liveness after ${live} s, ready after ${ready} s; stream ${t_stream} s"
if ((labels_ok != 0)); then
  echo "image-test: FAILED: the labels do not follow the conversation" >&2
  exit 1
fi
echo "image-test: ok"
