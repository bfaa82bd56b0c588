"""deer-diffrax: parallel-in-time Newton (DEER) solves for Diffrax."""

from ._damping import (
    AbstractDamping as AbstractDamping,
    NoDamping as NoDamping,
    ShrinkBlocksDamping as ShrinkBlocksDamping,
)
from ._dense import evaluate as evaluate
from ._diagnostics import (
    DeerDiagnostics as DeerDiagnostics,
    diagnostics as diagnostics,
)
from ._fallback import (
    AbstractFallback as AbstractFallback,
    NoFallback as NoFallback,
    SequentialFallback as SequentialFallback,
)
from ._guess import (
    AbstractInitialGuess as AbstractInitialGuess,
    ConstantGuess as ConstantGuess,
    PathGuess as PathGuess,
    PredictorGuess as PredictorGuess,
    PreviousWindowGuess as PreviousWindowGuess,
)
from ._interpolation import (
    DeerInterpolation as DeerInterpolation,
    DeerInterpolationFactory as DeerInterpolationFactory,
)
from ._jacobian import (
    AbstractJacobianMode as AbstractJacobianMode,
    BlockDiagonalJacobian as BlockDiagonalJacobian,
    DiagonalJacobian as DiagonalJacobian,
    FullJacobian as FullJacobian,
)
from ._levenberg_marquardt import (
    levenberg_marquardt_step as levenberg_marquardt_step,
    LevenbergMarquardt as LevenbergMarquardt,
    LevenbergMarquardtState as LevenbergMarquardtState,
)
from ._linearisation import (
    AbstractLinearisation as AbstractLinearisation,
    ResidualLinearisation as ResidualLinearisation,
    StepwiseLinearisation as StepwiseLinearisation,
    SurrogateLinearisation as SurrogateLinearisation,
)
from ._newton import DeerNewton as DeerNewton, DeerNewtonState as DeerNewtonState
from ._operator import (
    BlockBidiagonalOperator as BlockBidiagonalOperator,
    unit_lower_block_bidiagonal_tag as unit_lower_block_bidiagonal_tag,
)
from ._recurrence import scan as scan, ScanStats as ScanStats
from ._scan_solve import (
    AssociativeScanSolver as AssociativeScanSolver,
    solve_linear_recurrence as solve_linear_recurrence,
)
from ._sharded_scan import (
    sharded_linear_recurrence as sharded_linear_recurrence,
    ShardedScanSolver as ShardedScanSolver,
)
from ._solver import DeerSolver as DeerSolver, DeerState as DeerState
from ._trust_region import (
    TrustRegion as TrustRegion,
    TrustRegionState as TrustRegionState,
)


__version__ = "0.1.0"
