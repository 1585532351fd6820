# MLflow tracking server image: the official image plus what this stack's server needs and the image lacks:
# the PostgreSQL driver (backend store), boto3 (MinIO as the S3 artifact destination) and Flask-WTF (basic-auth app,
# MLflow's `auth` extra).
FROM ghcr.io/mlflow/mlflow:v3.17.2
RUN pip install --no-cache-dir psycopg2-binary==2.9.13 boto3==1.44.5 "Flask-WTF==1.3.0"
