# The tsq image: `docker run IMAGE worker`, `docker run IMAGE migrate`, `docker run IMAGE cancel ...`.

# Build tsq's wheel in a throwaway stage so the sources and build tools stay out of the image.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY tsq ./tsq
COPY workflows ./workflows
COPY activities ./activities
COPY worker ./worker
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
RUN useradd --create-home --uid 10001 --user-group tsq
USER tsq
WORKDIR /home/tsq
ENTRYPOINT ["tsq"]
CMD ["worker"]
