"""The registered model as an MLflow pyfunc ("models from code": this file is logged as the
model's definition, so nothing is unpickled at load; the weights are read with
``torch.load(weights_only=True)``).

Input: 8-bit frames, (N, H, W) or (H, W), any size. Output: (N, H, W) uint8 masks in {0, 1}
at the input's size, with the presence rule and post-processing frozen at registration.
"""

import numpy as np
from mlflow.pyfunc import PythonModel

import mlflow


class NerveSegmentationModel(PythonModel):
    def load_context(self, context):
        from pipeline.inference import Predictor

        # Loaded once and kept: reloading per call is a known cost in segmentation serving.
        self.predictor = Predictor.from_bundle(context.artifacts["bundle"])

    def predict(self, context, model_input, params=None):
        if isinstance(model_input, dict):  # named tensor from a serving request
            model_input = next(iter(model_input.values()))
        if hasattr(model_input, "to_numpy"):
            model_input = model_input.to_numpy()
        return self.predictor.predict(np.asarray(model_input))


mlflow.models.set_model(NerveSegmentationModel())
