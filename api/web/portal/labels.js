// Words for the API's codes: the seven HAM10000 classes (as ml/labels.py names them), referral reasons,
// out-of-distribution reasons and failure codes. An unknown code is shown as it is.

export const CLASS_NAMES = {
  akiec: "Actinic keratosis / intraepithelial carcinoma (Bowen's disease)",
  bcc: "Basal cell carcinoma",
  bkl: "Benign keratosis-like lesion",
  df: "Dermatofibroma",
  mel: "Melanoma",
  nv: "Melanocytic nevus",
  vasc: "Vascular lesion",
};

export const REFERRAL_REASONS = {
  concerning_label: "the label is a malignant or pre-malignant class",
  concerning_probability: "the malignant and pre-malignant classes together reach the referral threshold",
  high_uncertainty: "the model is uncertain about this image",
};

export const OOD_REASONS = {
  blank: "blank or almost uniform",
  noise: "mostly noise",
  colour: "colours unlike skin seen through a dermatoscope",
  energy: "nothing the model was trained on",
  feature_distance: "unlike the skin lesions the model was trained on",
};

export const STATUS_TEXT = {
  queued: "queued: waiting for a worker",
  running: "running: the model is looking at the image",
  succeeded: "finished",
  failed: "failed",
  purged: "patient data erased",
};

export const GRADCAM_TEXT = {
  timeout: "The heat map could not be made within its time budget; the classification still stands.",
  error: "The heat map could not be made; the classification still stands.",
};

export function className(code) {
  return CLASS_NAMES[code] ?? code;
}

export function wordsFor(table, code) {
  return table[code] ?? code;
}
