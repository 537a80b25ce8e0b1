"""Evaluation: the FID Inception network, FID / IS / precision-recall, the sample protocol.

    from dar_jax import evaluate as ev
    params = ev.load_inception("pt_inception-2015-12-05-6726825d.pth")
    extract = ev.feature_extractor(ev.InceptionConfig(protocol="adm"), params)   # all local devices
    ref = ev.read_reference("VIRTUAL_imagenet256_labeled.npz", extract, need_activations=True)
    plan = ev.prepare_shards("samples/", ev.sample_labels(50_000, 1000), 1000, settings)
    ev.generate_samples(plan, generate_fn)            # resumable
    stats, logits = ev.sample_features(plan, extract)
    results = ev.evaluate_features(stats, logits, ref)   # fid, inception_score, precision, recall
"""
from dar_jax.evaluate.inception import (Features, ImageInputError, InceptionConfig, check_images,
                                        feature_extractor)
from dar_jax.evaluate.inception import forward as inception_forward
from dar_jax.evaluate.inception import init_params as init_inception
from dar_jax.evaluate.inception import load_params as load_inception
from dar_jax.evaluate.metrics import (FeatureSizeError, MetricInputError, ReferenceFileError,
                                      ReferenceStats, RunningStats, check_reference, compute_stats,
                                      evaluate_features,
                                      fid_from_features, frechet_distance, inception_score,
                                      inception_score_splits, manifold_radii, precision_recall,
                                      read_reference, save_reference)
from dar_jax.evaluate.protocol import (ShardError, ShardPlan, assemble_npz, finished_shards,
                                       generate_samples, iter_shards, prepare_shards, sample_features,
                                       sample_labels, to_uint8)
