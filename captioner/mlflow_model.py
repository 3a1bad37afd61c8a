"""The MLflow model of a captioner: an `mlflow.pyfunc` PythonModel over `Captioner`, logged by training with
train.log_to: [..., mlflow] (engine/train/loggers/mlflow_log.py), so that MLflow serves and deploys it.

    mlflow models serve -m runs:/RUN_ID/model --env-manager local --port 5001
    curl -s localhost:5001/invocations -H 'Content-Type: application/json' \\
         -d '{"dataframe_records": [{"image": "<base64 of a JPEG or PNG>"}, {"path": "/data/photo.jpg"}]}'
    # -> {"predictions": [{"caption": "a dog on a beach", "score": -4.1, "error": ""}, ...]}

    model = mlflow.pyfunc.load_model("runs:/RUN_ID/model")
    model.predict(pandas.DataFrame({"path": ["photo.jpg"]}))   # a DataFrame: caption, score, error

Input: a DataFrame with an `image` column (the file's bytes, base64) or a `path` column (a file on the serving
machine), one image per row (a row may use either). Output: one row per input row, `caption` (as `captioner
caption` writes it for the same image), `score` (its log-probability) and `error` (why the image could not be
read; its caption is then ""). The model's artifact `model_folder` is the folder `captioner export` writes; this
file is logged beside it as the model's code (MLflow's models from code: no pickle), and captioner itself must be
installed where the model is served. Above the public API (it uses only `Captioner`); nothing in captioner
imports it (training logs it by its file's path).
"""
from __future__ import annotations

import base64
import binascii

from captioner.engine.train.loggers.mlflow_log import MODEL_ARTIFACT
from captioner.errors import CaptionerError

try:
    import mlflow
    import pandas as pd
    from mlflow.pyfunc import PythonModel
except ImportError:
    raise CaptionerError('captioner.mlflow_model is the MLflow model of a captioner and needs MLflow: pip install '
                         '"captioner[mlflow]"') from None

INPUT_COLUMNS = ("image", "path")  # base64 file bytes, or a path on the serving machine
OUTPUT_COLUMNS = ("caption", "score", "error")  # as mlflow_log.model_signature declares them


def _present(value) -> bool:
    return isinstance(value, str) and value != ""


class CaptionerModel(PythonModel):
    """Captions for a DataFrame of images (see the module docstring)."""

    def load_context(self, context) -> None:
        from captioner import Captioner
        device = (context.model_config or {}).get("device")  # None: CUDA when there is one
        self.captioner = Captioner.from_pretrained(context.artifacts[MODEL_ARTIFACT], device=device)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        if not isinstance(model_input, pd.DataFrame) or not any(c in model_input.columns for c in INPUT_COLUMNS):
            found = list(model_input.columns) if isinstance(model_input, pd.DataFrame) else type(model_input).__name__
            raise ValueError(f"the input needs an 'image' column (base64 file bytes) or a 'path' column (a file on "
                             f"the serving machine); got {found}")
        images, errors = [], {}
        for i, row in enumerate(model_input.to_dict("records")):
            if _present(row.get("image")):
                try:
                    images.append(base64.b64decode(row["image"], validate=True))
                except (binascii.Error, ValueError):
                    images.append(b"")
                    errors[i] = f"row {i}: 'image' is not base64"
            elif _present(row.get("path")):
                images.append(row["path"])
            else:
                images.append(b"")
                errors[i] = f"row {i}: neither 'image' (base64) nor 'path' given"
        captions = self.captioner.caption(images, errors="keep") if images else []
        rows = [("", 0.0, errors[i]) if i in errors else (c.text, float(c.score), c.error)
                for i, c in enumerate(captions)]
        return pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))


mlflow.models.set_model(CaptionerModel())  # what MLflow loads from this file (models from code)
