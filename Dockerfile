# librechat-bff: multi-stage build. The runtime image holds the binary, CA certificates and a
# non-root user; nothing else.
# The toolchain CI builds and tests with.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY provisioning ./provisioning
# A workspace member (the tests' harness): not built here, but cargo needs its manifest.
COPY test-support ./test-support
COPY src ./src
COPY config ./config
RUN cargo build --release --locked --bin librechat-bff

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin bff
COPY --from=build /src/target/release/librechat-bff /usr/local/bin/librechat-bff
USER 10001:10001
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/librechat-bff"]
CMD ["serve"]
