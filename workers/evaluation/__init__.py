"""Measuring detectors on labelled images, calibrating them, and choosing a flag threshold
with a stated false-positive guarantee: plain functions over arrays of scores and labels.

    datasets      labelled images from a GenImage tree, an {ai,real} tree, a CSV, or the
                  review's labelled examples
    degrade       GenImage's degradations (downscale, JPEG, blur)
    metrics       ROC AUC, average precision, rates at thresholds, Brier, ECE, intervals
    calibration   Platt / temperature / isotonic per detector; the ensemble's combination
    threshold     the Neyman-Pearson order-statistic threshold for a target FPR
    run           ``synthsentry eval``: score a set through the scan engine, measure it
    report        the evaluation's self-contained HTML report
    calibrate     ``synthsentry calibrate``: fit a configuration and its threshold
"""
