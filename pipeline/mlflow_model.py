"""The registered model as an MLflow pyfunc ("models from code": this file is logged as the
model's definition, so nothing is unpickled at load; the weights are read with
``torch.load(weights_only=True)``).

Input, told apart by its type (``pipeline.serving``): uint8 frames, (N, H, W) or (H, W), any size
(the tensor form); or a column ``image`` of PNG/TIFF/JPEG files, base64 in JSON (the image form).
Output: masks at the input's size, with the presence rule and post-processing frozen at registration,
as the ``output`` parameter asks: ``tensor`` ((N, H, W) uint8 in {0, 1}), ``png`` or ``rle``; by
default in the form of the request.
"""

from mlflow.pyfunc import PythonModel

import mlflow


class NerveSegmentationModel(PythonModel):
    def load_context(self, context):
        from pipeline.inference import Predictor

        # Loaded once and kept: reloading per call is a known cost in segmentation serving.
        self.predictor = Predictor.from_bundle(context.artifacts["bundle"])

    def predict(self, context, model_input, params=None):
        from pipeline import serving

        images = serving.image_values(model_input)
        output = serving.output_form(params, images is not None)
        if images is None:
            masks = self.predictor.predict(serving.tensor_frames(model_input))
        else:
            masks = serving.predict_images(self.predictor, images)
        return serving.answer(masks, output)


mlflow.models.set_model(NerveSegmentationModel())
