"""MLflow models-from-code entry of the logged reward model: the python model is built here, never unpickled."""

import mlflow

from cyclepref.reward.pyfunc import RewardPyfunc

mlflow.models.set_model(RewardPyfunc())
