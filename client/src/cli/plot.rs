//! The accuracy chart: training and validation accuracy per epoch, as the tutorial draws it.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::FontStyle;
use recur_proto::v1 as pb;

use super::error::CliError;

static FONT: Once = Once::new();

/// Writes the chart to `path`: PNG or SVG by extension.
pub fn accuracy_chart(
    path: &Path,
    title: &str,
    epochs: &[pb::EpochMetrics],
) -> Result<(), CliError> {
    FONT.call_once(|| {
        // The embedded DejaVu Sans: no system font library is needed.
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
    });
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    let size = (900, 540);
    let drawn = match ext.as_str() {
        "png" => draw(
            BitMapBackend::new(path, size).into_drawing_area(),
            title,
            epochs,
        ),
        "svg" => draw(
            SVGBackend::new(path, size).into_drawing_area(),
            title,
            epochs,
        ),
        _ => {
            return Err(CliError::new(
                format!("{}: the chart must be a .png or .svg file", path.display()),
                "name the output file with .png or .svg",
            ));
        }
    };
    drawn.map_err(|e| {
        CliError::new(
            format!("{}: cannot draw the chart: {e}", path.display()),
            "",
        )
    })
}

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    epochs: &[pb::EpochMetrics],
) -> Result<(), Box<dyn std::error::Error>>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let last = epochs.last().map_or(1, |e| e.epoch.max(1));
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0u64..last, 0f64..1f64)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc("accuracy")
        .label_style(("sans-serif", 14))
        .draw()?;
    // Early epochs can be far below 0; the chart shows 0..1 as the tutorial's does.
    let clamp = |v: f64| v.clamp(0.0, 1.0);
    let train = epochs.iter().map(|e| (e.epoch, clamp(e.train_accuracy)));
    let val = epochs.iter().map(|e| {
        (
            e.epoch,
            clamp(e.validation.as_ref().map_or(0.0, |m| m.accuracy)),
        )
    });
    chart
        .draw_series(LineSeries::new(train, BLUE.stroke_width(2)))?
        .label("training accuracy")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    chart
        .draw_series(LineSeries::new(val, RED.stroke_width(2)))?
        .label("validating accuracy")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
