# switchboard: the gateway in a slim image (docs/deployment.md, "Container image").
#
#   docker build -t switchboard .
#   docker run -p 8080:8080 -v switchboard-data:/data \
#     -v $PWD/switchboard.toml:/etc/switchboard/switchboard.toml:ro -e OPENAI_API_KEY switchboard
#
# The config should listen on 0.0.0.0:8080 and keep its store in /data
# ([store].url = "sqlite:///data/switchboard.db"); mount it at /etc/switchboard/switchboard.toml
# (or pass another `--config`). Needs BuildKit (the default builder) for the cache mounts.

# --- build: the `dist` profile (fat LTO, one codegen unit; a few minutes) ---
FROM rust:1.89-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --locked --profile dist --bin switchboard \
    && cp target/dist/switchboard /usr/local/bin/switchboard

# --- run: the binary alone, as a non-root user ---
FROM debian:bookworm-slim
# curl for the HEALTHCHECK only (upstream TLS uses the binary's built-in webpki roots).
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin switchboard \
    && mkdir -p /data /etc/switchboard \
    && chown switchboard:switchboard /data
COPY --from=build /usr/local/bin/switchboard /usr/local/bin/switchboard
USER switchboard
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8080
ENV RUST_LOG=info
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8080/healthz || exit 1
# SIGTERM drains in-flight streams (30 s) and commits settlements: run with --stop-timeout 60.
STOPSIGNAL SIGTERM
ENTRYPOINT ["switchboard"]
CMD ["serve", "--config", "/etc/switchboard/switchboard.toml"]
