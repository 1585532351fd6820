"""What the registry serves: an MLflow "models from code" pyfunc around the merged model.

`chat_model.py` is logged as a file, not imported: it must load where only mlflow, torch and
transformers are installed, so it imports nothing from alignpipe.
"""

from pathlib import Path

CHAT_MODEL_CODE = Path(__file__).resolve().parent / "chat_model.py"

__all__ = ["CHAT_MODEL_CODE"]
