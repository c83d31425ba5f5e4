"""Energy, carbon and cost: power meters, grid intensity, prices and carbon-aware scheduling.

`accounting.EnergyAccountant` is what the trainer holds; `cost.footprint` turns kWh into CO2 and money
(the planner uses it too); `schedule` decides carbon-aware pauses. Nothing here knows the model.
"""

from leantrain.energy.carbon import intensity, regions
from leantrain.energy.cost import footprint

__all__ = ["footprint", "intensity", "regions"]
