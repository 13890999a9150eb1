#!/usr/bin/env bash
# Make the TLS and token files for a GELATO edge and its devices (openssl only):
#   docker/make-secrets.sh OUT_DIR [NAME ...]
# NAME: the DNS names and IP addresses devices use to reach the edge (its certificate's subject
# alternative names; default: edge localhost 127.0.0.1). Writes into OUT_DIR:
#   ca.crt                  the CA devices trust (--tls-ca); ca.key stays with whoever signs
#   edge.crt, edge.key      the edge's certificate and key (--tls-cert, --tls-key)
#   device.crt, device.key  a client certificate for mutual TLS (edge: --tls-client-ca ca.crt)
#   token                   the bearer token both sides read (--auth-token-file)
# GELATO_CERT_DAYS: how long the certificates it issues are valid (default 825 days).
# The containers run as uid 10001: run as root and the private files are given to that uid (0600;
# a host account with uid 10001 could then read them: give the containers another uid there),
# otherwise they stay yours alone (0600): `podman unshare chown 10001 OUT_DIR/edge.key
# OUT_DIR/device.key OUT_DIR/token` before mounting with rootless Podman (`sudo chown 10001 ...` with
# Docker or rootful Podman; never ca.key: whoever holds it can mint certificates devices trust).
# Existing files are kept (delete OUT_DIR to start over); an existing edge.crt that does not name
# the NAMEs given, an expired certificate, a certificate ca.crt did not sign, or a ca.crt without
# ca.key when something must be signed, is an error, not silently kept or replaced (a new CA would
# leave every device's ca.crt stale). The names printed are read back from edge.crt.
set -Eeuo pipefail  # -E: the ERR trap below in functions too
out=${1:?usage: make-secrets.sh OUT_DIR [NAME ...]}
shift
names=("$@")
asked=${#names[@]}  # names given: an existing edge.crt must carry them
[ "$asked" -gt 0 ] || names=(edge localhost 127.0.0.1)
days=${GELATO_CERT_DAYS:-825}
if ! [[ $days =~ ^[1-9][0-9]{0,5}$ ]]; then
  echo "error: GELATO_CERT_DAYS=$days is not a whole number of days (1 to 999999)" >&2
  exit 2
fi
mkdir -p "$out"
cd "$out"

trap 'echo "error: make-secrets.sh failed at line $LINENO (openssl'"'"'s output is hidden: bash -x shows the step)" >&2' ERR
san=""
for n in "${names[@]}"; do  # each name checked first: openssl would fail on it with its output hidden
  if [[ $n =~ ^[0-9]+(\.[0-9]+){3}$ ]]; then
    IFS=. read -r a b c d <<< "$n"
    if ((10#$a > 255 || 10#$b > 255 || 10#$c > 255 || 10#$d > 255)); then echo "error: $n is no IPv4 address" >&2; exit 2; fi
    san+="IP:$n,"
  elif [[ $n == *:* ]]; then
    if [[ ! $n =~ ^[0-9A-Fa-f:.]+$ || $n != *:*:* ]]; then
      echo "error: $n: give the edge's name or address without a port (a NAME is not HOST:PORT)" >&2
      exit 2
    fi
    san+="IP:$n,"
  elif [[ $n =~ ^(\*\.)?[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$ && ! $n =~ ^[0-9.]+$ ]]; then
    san+="DNS:$n,"
  else
    echo "error: $n is no DNS name or IP address" >&2
    exit 2
  fi
done
san=${san%,}
for f in ca.crt ca.key edge.crt edge.key device.crt device.key token; do
  if [ -d "$f" ]; then  # docker compose makes a missing bind-mount source a directory
    echo "error: $out/$f is a directory (a container started before this script made it?): remove it" >&2
    exit 2
  fi
done

for n in edge device; do  # a kept certificate is no use without its key (after the chown it may not be ours: -e)
  if [ -s "$n.crt" ] && [ ! -e "$n.key" ]; then
    echo "error: $out/$n.crt is here without its key $n.key: delete $out/$n.crt to issue a new pair" >&2
    exit 1
  fi
done
missing=""
for n in edge device; do [ -s "$n.crt" ] || missing+=" $n.crt"; done
if [ -s ca.crt ] && [ ! -s ca.key ] && [ -n "$missing" ]; then
  echo "error: $out/ca.crt is here without its key ca.key, which signs$missing: put ca.key back" \
    "(a new CA would leave the ca.crt devices hold stale), or delete $out to start over" >&2
  exit 1
fi
if [ -s ca.key ] && [ ! -s ca.crt ]; then
  echo "error: $out/ca.key is here without its certificate ca.crt: put ca.crt back, or delete $out to start over" >&2
  exit 1
fi
if [ ! -s ca.crt ]; then
  openssl req -x509 -newkey rsa:3072 -nodes -keyout ca.key -out ca.crt -days "$days" \
    -subj "/CN=gelato-ca" -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
fi

issue() {  # issue NAME CN EXTENDED_KEY_USAGE [SAN]
  local name=$1 cn=$2 eku=$3 alt=${4:-}
  [ -s "$name.crt" ] && return 0
  openssl req -newkey rsa:2048 -nodes -keyout "$name.key" -out "$name.csr" -subj "/CN=$cn" 2>/dev/null
  {
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=$eku"
    [ -n "$alt" ] && echo "subjectAltName=$alt"
  } > "$name.ext"
  openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days "$days" \
    -extfile "$name.ext" -out "$name.crt" 2>/dev/null
  rm -f "$name.csr" "$name.ext"
}
for crt in ca.crt edge.crt device.crt; do  # kept files must still be valid: an expired one fails every handshake
  if [ -s "$crt" ] && ! openssl x509 -in "$crt" -noout -checkend 0 >/dev/null 2>&1; then
    echo "error: $out/$crt has expired ($(openssl x509 -in "$crt" -noout -enddate 2>/dev/null));" \
      "delete it (and its key; for ca.crt every file) to issue a new one" >&2
    exit 1
  fi
done
for crt in edge.crt device.crt; do  # kept files must chain to the ca.crt devices are given
  if [ -s "$crt" ] && ! openssl verify -CAfile ca.crt "$crt" >/dev/null 2>&1; then
    echo "error: $out/$crt was not signed by $out/ca.crt; delete it (and its key) to issue one from this CA" >&2
    exit 1
  fi
done
if [ -s edge.crt ] && [ "$asked" -gt 0 ]; then  # kept: it must name what was asked for, or devices fail the TLS name check
  have=$(openssl x509 -in edge.crt -noout -ext subjectAltName 2>/dev/null | tail -n +2 | tr -d ' ')
  for n in "${names[@]}"; do
    [[ $n == *:* ]] && continue  # IPv6: openssl prints its own form; not compared
    if [[ ",$have," != *",DNS:$n,"* && ",$have," != *",IPAddress:$n,"* ]]; then
      echo "error: $out/edge.crt exists and does not name $n (it names: ${have:-nothing});" \
        "delete $out/edge.crt and $out/edge.key to issue one for: ${names[*]}" >&2
      exit 1
    fi
  done
fi
issue edge "${names[0]}" serverAuth "$san"
issue device gelato-device clientAuth

[ -s token ] || (umask 077 && openssl rand -hex 32 > token)  # never readable by others, not even briefly
chmod 0644 ca.crt edge.crt device.crt
if [ -e ca.key ]; then chmod 0600 ca.key; fi
# Owner-only: group read would hand them to everyone in the group (a host group 10001, or your
# primary group). As root, the owner is the containers' uid 10001.
# A re-run after the documented chown to 10001 leaves alone what is no longer this user's (chmod
# would fail on it; its mode is already 0600). Root can chmod anything: every file, before the
# chown (a token kept from elsewhere at 0644 was once handed over as it was).
for f in edge.key device.key token; do
  if [ -O "$f" ] || [ "$(id -u)" = 0 ]; then chmod 0600 "$f"; fi
done
if [ "$(id -u)" = 0 ]; then chown 10001:10001 edge.key device.key token; fi
names_read=$(openssl x509 -in edge.crt -noout -ext subjectAltName 2>/dev/null | tail -n +2 | sed 's/^ *//')
echo "secrets in $out: ca.crt edge.crt edge.key device.crt device.key token (edge.crt names: $names_read)"
if [ "$(id -u)" != 0 ]; then
  echo "note: not root, so edge.key, device.key and token stay yours (0600); the containers run as uid 10001:" \
    "before mounting them, with rootless Podman: podman unshare chown 10001 $out/edge.key $out/device.key" \
    "$out/token (its uid 10001 is one of your subordinate uids); with Docker or rootful Podman: sudo chown" \
    "10001 $out/edge.key $out/device.key $out/token" >&2
fi
