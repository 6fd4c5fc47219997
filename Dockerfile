# Glued container image: a `FROM scratch` root file system holding the glued
# binary, the shared libraries it links, and the glibc NSS modules (so
# bootstrap peers given as `ID@name:port` resolve through Docker's DNS).
# Glued runs as PID 1 and stops cleanly on SIGTERM (`docker stop`).
#
# Two ways to the same final stage:
#
#   Online (needs the rust:1-bookworm image, pulled from a registry):
#       docker build -t glued .
#
#   Offline (CI, air-gapped hosts): build the binary on the host, turn it
#   into a root file system, and build only the first stage, which needs no
#   base image at all:
#       cargo build --release --locked
#       docker/make-rootfs.sh target/release/glued dist/rootfs
#       docker build --target offline -t glued .
#
# The offline stage is FIRST on purpose: the legacy builder (no BuildKit)
# runs every stage up to the target, so a `--target offline` build never
# touches the rust image. A plain `docker build .` also runs it, on the empty
# dist/rootfs kept in the repository, which costs nothing.
#
# Runtime (see README.md / docker-compose.yml):
#   -v /var/run/docker.sock:/var/run/docker.sock:ro   Docker engine (read-only)
#   -v glued-data:/var/lib/glued                      node key (stable id)
#   53/udp + 53/tcp   DNS (GLUED_DNS_BIND: 0.0.0.0:53 in the image, since the
#                     binary's default `auto` serves loopback and the Docker
#                     gateways of the host's own network namespace)
#   9254/udp          gossip, iroh QUIC (GLUED_GOSSIP_BIND, default 0.0.0.0:9254)
#   9253/tcp          HTTP status (GLUED_HTTP_BIND, default 127.0.0.1:9253)
#
# HEALTHCHECK: `glued health` asks the daemon's /healthz (at its own
# GLUED_HTTP_BIND, loopback when that is a wildcard): every component thread
# alive and the Docker engine answered within docker_health_secs (30 s).

# ---- offline: root file system prepared on the host -----------------------
FROM scratch AS offline
COPY dist/rootfs/ /
EXPOSE 53/udp 53/tcp 9254/udp
ENV GLUED_DNS_BIND=0.0.0.0:53
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/glued", "health"]
ENTRYPOINT ["/usr/local/bin/glued"]
CMD ["run"]

# ---- build: compile and assemble the root file system ---------------------
FROM rust:1-bookworm AS build
WORKDIR /src
# Everything .dockerignore lets through: the crate, its tests and benches
# (so every target Cargo.toml names exists) and docker/make-rootfs.sh.
COPY . .
# Symbols stripped: the binary is most of the image.
RUN CARGO_PROFILE_RELEASE_STRIP=symbols cargo build --release --locked \
 && sh docker/make-rootfs.sh target/release/glued /rootfs

# ---- final (default): the same image as `offline`, built from source ------
FROM scratch AS final
COPY --from=build /rootfs/ /
EXPOSE 53/udp 53/tcp 9254/udp
ENV GLUED_DNS_BIND=0.0.0.0:53
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/glued", "health"]
ENTRYPOINT ["/usr/local/bin/glued"]
CMD ["run"]
